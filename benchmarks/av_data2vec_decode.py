"""Decoding speed of the Base AV-data2vec seq2seq recogniser on CPU, as ``fairseq-generate``
runs it (``av_speech_recognition`` task, its ``build_generator``, ``inference_step``): real-time
factor, tokens per second and where the time goes, per input modality and beam size.

    python benchmarks/av_data2vec_decode.py --threads 1 --seconds 3 --tokens 12 --beams 5 50

The model has random weights (no trained checkpoint can be downloaded here), so hypotheses
would end at a random step; ``min_len = max_len = --tokens`` (``max_len_a = 0``) makes every
beam run exactly that many steps instead (12 sentencepiece pieces + eos is about a 3 s LRS3
utterance). The vocabulary has 1000 pieces (the paper's unigram size). One utterance per
batch (``--batch-size 1``), as a streaming user decodes. RTF = decoding seconds / audio
seconds; ``encoder`` is the encoder forward, ``decoder`` the incremental decoder forwards
(6 layers + output projection, all beams), ``search`` the rest of fairseq's beam search.
"""
import argparse
import os
import tempfile
import time
from typing import Callable, Dict

import torch

from _bench_utils_d2v import format_table, machine_description, set_threads

VIDEO_FPS = 25
CROP_SIZE = 88
VOCABULARY_SIZE = 1000
MODALITIES = ("audio", "video", "audio,video")


def make_task_dir(root: str) -> str:
    """A data folder ``fairseq-generate`` accepts: a sentencepiece model (only loaded, never
    used: the inputs are tensors) and a ``dict.wrd.txt`` of VOCABULARY_SIZE pieces."""
    from fairseq.data import Dictionary

    from preprocess.build_vocab import build_vocab

    words = ["red", "green", "blue", "one", "two", "three", "soon", "again", "place", "white"]
    lines = [" ".join(words[(start + step) % len(words)] for step in range(3)) for start in range(len(words))]
    with open(os.path.join(root, "train.wrd"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    build_vocab(os.path.join(root, "train.wrd"), root, vocab_size=40)
    dictionary = Dictionary()
    for index in range(VOCABULARY_SIZE - len(dictionary)):
        dictionary.add_symbol(f"piece{index}")
    dictionary.save(os.path.join(root, "dict.wrd.txt"))
    return root


def setup(data_dir: str, modalities: str):
    """(task, Base seq2seq model in eval mode) built as ``fairseq-generate`` builds them."""
    from fairseq import tasks
    from omegaconf import OmegaConf

    import avplugins  # noqa: F401  (registers the plugin)

    task = tasks.setup_task(OmegaConf.create({
        "_name": "av_speech_recognition", "data": data_dir, "modalities": modalities, "seed": 1,
        "train_subset": "train",
    }))
    torch.manual_seed(0)
    model = task.build_model(OmegaConf.create({"_name": "av_data2vec_seq2seq_base"})).eval()
    return task, model


def random_sample(modalities: str, clips: int, frames: int, seed: int = 0) -> dict:
    """A collated test batch: the streams of ``modalities``, full length, no target."""
    generator = torch.Generator().manual_seed(seed)
    streams = modalities.split(",")
    audio = torch.randn(clips, frames, 104, generator=generator) if "audio" in streams else None
    video = (torch.randn(clips, 1, frames, CROP_SIZE, CROP_SIZE, generator=generator)
             if "video" in streams else None)
    return {
        "id": torch.arange(clips),
        "nsentences": clips,
        "ntokens": clips * frames,
        "net_input": {"audio": audio, "video": video,
                      "padding_mask": torch.zeros(clips, frames, dtype=torch.bool)},
    }


class Stopwatch:
    """Accumulates the seconds spent in wrapped callables under a name."""

    def __init__(self):
        self.seconds: Dict[str, float] = {}

    def wrap(self, name: str, function: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        return timed


def decode_once(task, model, generator, sample) -> Dict[str, float]:
    """Seconds of one ``inference_step``: total, encoder, decoder forwards, search rest."""
    watch = Stopwatch()
    model.encoder.forward = watch.wrap("encoder", type(model.encoder).forward.__get__(model.encoder))
    model.decoder.forward = watch.wrap("decoder", type(model.decoder).forward.__get__(model.decoder))
    try:
        start = time.perf_counter()
        with torch.inference_mode():
            hypotheses = task.inference_step(generator, [model], sample)
        total = time.perf_counter() - start
    finally:
        del model.encoder.forward, model.decoder.forward
    steps = {len(hypos[0]["tokens"]) for hypos in hypotheses}
    return {**watch.seconds, "total": total, "search": total - sum(watch.seconds.values()),
            "hypothesis_tokens": steps.pop() if len(steps) == 1 else -1}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=3.0, help="utterance length (s)")
    parser.add_argument("--tokens", type=int, default=12, help="pieces per hypothesis (plus eos)")
    parser.add_argument("--beams", type=int, nargs="+", default=[5, 50])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per setting (best kept)")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    from fairseq.dataclass.configs import GenerationConfig

    frames = round(args.seconds * VIDEO_FPS)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        data_dir = make_task_dir(root)
        task, model = setup(data_dir, "audio,video")
        for modalities in MODALITIES:
            sample = random_sample(modalities, args.batch_size, frames)
            for beam in args.beams:
                generator = task.build_generator([model], GenerationConfig(
                    beam=beam, max_len_a=0, max_len_b=args.tokens, min_len=args.tokens,
                ))
                decode_once(task, model, generator, sample)  # warm-up
                runs = [decode_once(task, model, generator, sample) for _ in range(args.repeats)]
                best = min(runs, key=lambda run: run["total"])
                if best["hypothesis_tokens"] != args.tokens + 1:
                    raise SystemExit(f"hypotheses have {best['hypothesis_tokens']} tokens, expected {args.tokens + 1}")
                audio_seconds = args.seconds * args.batch_size
                tokens = (args.tokens + 1) * args.batch_size
                rows.append((
                    modalities.replace(",", "+"), beam, f"{best['total']:.2f}",
                    f"{best['total'] / audio_seconds:.3f}", f"{tokens / best['total']:.1f}",
                    f"{best['encoder']:.2f}", f"{best['decoder']:.2f}", f"{best['search']:.2f}",
                ))
    print(f"machine: {machine_description()}")
    print(f"input: {args.batch_size} x {args.seconds:g} s ({frames} frames), Base encoder (12 x 768) + "
          f"decoder (6 x 768, 4 heads), {VOCABULARY_SIZE}-piece vocabulary, random weights, "
          f"{args.tokens} pieces + eos per hypothesis, fp32")
    print()
    print(format_table(
        ["modalities", "beam", "seconds", "RTF", "tokens/s", "encoder s", "decoder s", "search s"], rows,
    ))


if __name__ == "__main__":
    main()
