"""One AV-data2vec pre-training update at the Base size: time per phase, FLOPs, achieved FLOP/s
as a fraction of this machine's measured fp32 matmul peak, and the activations kept for
backward by the student and by the EMA teacher (which must keep none).

    python benchmarks/av_data2vec_pretrain.py --threads 1 --clips 2 --seconds 2.5

One update = criterion forward (student on masked audio+video, teacher on unmasked audio),
backward, Adam step, EMA step. Every utterance gets both streams (``student_p_av=1``, the
costliest case) and layerdrop is off, so the FLOP count is the same in every run. FLOPs are
counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention:
2 per multiply-add) over forward + backward; element-wise work is not counted.
"""
import argparse
import time
from contextlib import contextmanager
from typing import Dict, Iterator, Tuple

import torch
from torch.utils.flop_counter import FlopCounterMode

from _bench_utils_d2v import (
    best_seconds, format_table, machine_description, measured_matmul_peak, set_threads,
)

VIDEO_FPS = 25
CROP_SIZE = 88


def build_base_model():
    """The registered ``av_data2vec_base`` model (fp32, training mode, teacher made), with
    every utterance seeing both streams and no layerdrop (a fixed amount of work)."""
    from fairseq import models
    from omegaconf import OmegaConf

    import avplugins  # noqa: F401  (registers the plugin)

    torch.manual_seed(0)
    model = models.build_model(OmegaConf.create({
        "_name": "av_data2vec_base", "encoder_layerdrop": 0.0,
        "student_p_av_start": 1.0, "student_p_av_end": 1.0,
    }), None)
    model.train()
    model.set_num_updates(0)
    return model


def random_batch(clips: int, frames: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """net_input of ``clips`` full-length utterances: audio (B, T, 104), video (B, 1, T, 88, 88)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "audio": torch.randn(clips, frames, 104, generator=generator),
        "video": torch.randn(clips, 1, frames, CROP_SIZE, CROP_SIZE, generator=generator),
        "padding_mask": torch.zeros(clips, frames, dtype=torch.bool),
    }


@contextmanager
def saved_activation_bytes() -> Iterator[Dict[str, int]]:
    """Counts the bytes autograd saves for backward inside the block: ``{"bytes": n}``."""
    counter = {"bytes": 0}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        counter["bytes"] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield counter


class TeacherTimer:
    """Wraps ``model.compute_targets`` to time it and count what it saves for backward."""

    def __init__(self, model):
        self.model = model
        self.original = model.compute_targets
        self.seconds = 0.0
        self.saved_bytes = 0
        self.targets_require_grad = None
        model.compute_targets = self

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        with saved_activation_bytes() as saved:
            targets = self.original(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        self.saved_bytes += saved["bytes"]
        self.targets_require_grad = targets.requires_grad or targets.grad_fn is not None
        return targets


def as_sample(batch: Dict[str, torch.Tensor]) -> dict:
    """The fairseq sample the task's collater would make of ``batch``."""
    clips, frames = batch["padding_mask"].shape
    return {"net_input": batch, "nsentences": clips, "ntokens": clips * frames}


def one_update(model, criterion, optimizer, batch, timings: Dict[str, float]) -> None:
    """Forward, backward, optimizer step and EMA step; adds each phase's seconds to ``timings``."""
    sample = as_sample(batch)
    optimizer.zero_grad(set_to_none=True)
    start = time.perf_counter()
    loss, _, _ = criterion(model, sample)
    forward_done = time.perf_counter()
    loss.backward()
    backward_done = time.perf_counter()
    optimizer.step()
    step_done = time.perf_counter()
    model.set_num_updates(model.num_updates + 1)
    ema_done = time.perf_counter()
    for name, seconds in (("forward (student + teacher)", forward_done - start),
                          ("backward", backward_done - forward_done),
                          ("Adam step", step_done - backward_done),
                          ("EMA teacher step", ema_done - step_done)):
        timings[name] = timings.get(name, 0.0) + seconds


def count_flops(model, criterion, batch) -> Tuple[int, int]:
    """(forward + backward FLOPs of one update, of which the teacher forward)."""
    teacher_flops = {"n": 0}
    original = model.compute_targets

    def counted_targets(*args, **kwargs):
        with FlopCounterMode(display=False) as inner:
            targets = original(*args, **kwargs)
        teacher_flops["n"] = inner.get_total_flops()
        return targets

    model.compute_targets = counted_targets
    try:
        with FlopCounterMode(display=False) as counter:
            loss, _, _ = criterion(model, as_sample(batch))
            loss.backward()
    finally:
        del model.compute_targets
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops(), teacher_flops["n"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clips", type=int, default=2, help="utterances per batch")
    parser.add_argument("--seconds", type=float, default=2.5, help="utterance length (s, 25 fps)")
    parser.add_argument("--updates", type=int, default=2, help="timed updates (after one warm-up)")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler's top operators")
    args = parser.parse_args(argv)
    set_threads(args.threads)

    from avplugins.criterions.av_data2vec_regression import (
        AVData2VecRegressionConfig, AVData2VecRegressionCriterion,
    )

    frames = round(args.seconds * VIDEO_FPS)
    model = build_base_model()
    criterion = AVData2VecRegressionCriterion(None, AVData2VecRegressionConfig())
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)
    batch = random_batch(args.clips, frames)

    peak = measured_matmul_peak()
    total_flops, teacher_flops = count_flops(model, criterion, batch)

    with saved_activation_bytes() as student_saved:
        loss, _, _ = criterion(model, as_sample(batch))
    del loss
    teacher = TeacherTimer(model)
    one_update(model, criterion, optimizer, batch, {})  # warm-up
    teacher.seconds = 0.0
    timings: Dict[str, float] = {}
    update_seconds = best_seconds(lambda: one_update(model, criterion, optimizer, batch, timings),
                                  repeats=args.updates, warmup=0)
    per_update = {name: seconds / args.updates for name, seconds in timings.items()}
    teacher_seconds = teacher.seconds / args.updates

    print(f"machine: {machine_description()}")
    print(f"batch: {args.clips} clips x {frames} frames ({args.seconds:g} s), 88x88 video + 104-d audio, fp32")
    print(f"measured fp32 matmul peak (2048^3 mm): {peak / 1e9:.1f} GFLOP/s")
    print()
    rows = [(name, f"{seconds:.3f}", f"{100 * seconds / sum(per_update.values()):.0f} %")
            for name, seconds in per_update.items()]
    rows.insert(1, ("  of which teacher forward (no_grad)", f"{teacher_seconds:.3f}", ""))
    print(format_table(["phase", "seconds / update", "share"], rows))
    print()
    achieved = total_flops / update_seconds
    print(format_table(
        ["FLOPs / update (fwd+bwd)", "of which teacher", "best update (s)", "achieved GFLOP/s",
         "matmul peak GFLOP/s", "fraction of peak"],
        [(f"{total_flops / 1e9:.1f} G", f"{teacher_flops / 1e9:.1f} G", f"{update_seconds:.2f}",
          f"{achieved / 1e9:.1f}", f"{peak / 1e9:.1f}", f"{achieved / peak:.2f}")],
    ))
    print()
    print(format_table(
        ["", "activations saved for backward (MiB)", "targets require grad"],
        [("student (criterion forward, incl. teacher)", f"{student_saved['bytes'] / 2**20:.0f}", ""),
         ("teacher forward", f"{teacher.saved_bytes / 2**20:.0f}", str(teacher.targets_require_grad))],
    ))
    if teacher.saved_bytes or teacher.targets_require_grad:
        raise SystemExit("the teacher kept activations for backward")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            one_update(model, criterion, optimizer, batch, {})
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
