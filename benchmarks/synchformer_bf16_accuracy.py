"""Does bfloat16 change what a trained Synchformer predicts? Accuracy on a fixed-offset test set.

Loads a stage-2 checkpoint, reads the split through its own ``av_sync`` task (the fixed offsets
of ``<split>_offsets.csv``, the model's crop; raw clips through the towers, never a feature
cache), and scores every batch three ways, side by side:

  fp32              the checkpoint as trained
  bf16 autocast     the same model under ``torch.autocast("cpu", dtype=bfloat16)``
  bf16 weights      a bfloat16 copy of the model on bfloat16 inputs

Prints a table: accuracy@1 / +-1 class / @5, the share of clips whose predicted class equals
fp32's, the max |logit difference| from fp32, and the seconds spent in the model.

    python benchmarks/synchformer_bf16_accuracy.py --checkpoint runs/sync/checkpoint_last.pt \
        --data data/speech_long_dec48 --subset test
"""
import argparse
import copy
import time
from typing import Callable, Dict, List

import torch

import avplugins  # noqa: F401  (registers the plugin)
from avplugins.checkpoint import load_model_and_config
from avplugins.criterions.av_sync_offset import offset_hits


def variants(model: torch.nn.Module) -> Dict[str, Callable[[dict], torch.Tensor]]:
    """name -> function of a batch's net_input returning float32 offset logits (B, C)."""
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)

    def fp32(net_input):
        return model(**net_input)["offset_logits"]

    def bf16_autocast(net_input):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(**net_input)["offset_logits"].float()

    def bf16_weights(net_input):
        audio = net_input["audio"].bfloat16()
        return model_bf16(**{**net_input, "audio": audio})["offset_logits"].float()

    return {"fp32": fp32, "bf16 autocast": bf16_autocast, "bf16 weights": bf16_weights}


def evaluate(model, batches: List[dict]) -> Dict[str, dict]:
    """Run every variant on every batch; returns name -> hit counts, agreement, diff, seconds."""
    runs = variants(model)
    results = {name: {"correct_1": 0, "correct_1_tol": 0, "correct_5": 0, "same_argmax": 0,
                      "max_abs_diff": 0.0, "seconds": 0.0} for name in runs}
    with torch.inference_mode():
        for batch in batches:
            reference = None
            for name, run in runs.items():
                start = time.perf_counter()
                logits = run(batch["net_input"])
                results[name]["seconds"] += time.perf_counter() - start
                reference = logits if reference is None else reference
                for key, count in offset_hits(logits, batch["target"]).items():
                    results[name][key] += count
                results[name]["same_argmax"] += int((logits.argmax(-1) == reference.argmax(-1)).sum())
                diff = (logits - reference).abs().max().item()
                results[name]["max_abs_diff"] = max(results[name]["max_abs_diff"], diff)
    return results


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a stage-2 (synchformer) checkpoint")
    parser.add_argument("--data", help="the corpus folder, when it moved since training (task.data)")
    parser.add_argument("--decoded-clips", help="pre-decoded clips folder (task.decoded_clips), if any")
    parser.add_argument("--subset", default="test")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    # always through the towers (never a training-time feature cache): they are what bf16 changes
    overrides = {"feature_cache": None}
    overrides.update({key: value for key, value in (("data", args.data), ("decoded_clips", args.decoded_clips)) if value})
    model, cfg = load_model_and_config(args.checkpoint, task_overrides=overrides)
    if cfg.model.get("_name", "").startswith("synchformer_segment_clip"):
        raise SystemExit(f"{args.checkpoint} is a stage-1 checkpoint; give a stage-2 (synchformer) one")
    from fairseq import tasks

    task = tasks.setup_task(cfg.task)
    task.load_dataset(args.subset)
    dataset = task.dataset(args.subset)
    iterator = task.get_batch_iterator(dataset, max_sentences=args.batch_size, ignore_invalid_inputs=False)
    batches = list(iterator.next_epoch_itr(shuffle=False))
    clips = sum(batch["target"].numel() for batch in batches)
    results = evaluate(model, batches)

    print(f"torch {torch.__version__}, {args.threads} threads; {args.checkpoint}, {args.subset}: {clips} clips")
    print()
    print("| variant | accuracy@1 | +-1 class | accuracy@5 | argmax = fp32 | max abs diff logits | model seconds |")
    print("|---|---|---|---|---|---|---|")
    for name, result in results.items():
        print(f"| {name} | {result['correct_1'] / clips:.3f} | {result['correct_1_tol'] / clips:.3f} | "
              f"{result['correct_5'] / clips:.3f} | {result['same_argmax'] / clips:.3f} | "
              f"{result['max_abs_diff']:.2e} | {result['seconds']:.1f} |")


if __name__ == "__main__":
    main()
