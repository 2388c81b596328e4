"""Synchformer inference throughput at the paper's size, side by side in one process.

Variants (same weights, same inputs):
  eager fp32           benchmarks/_eager_reference.py: unfused softmax attention, one segment at a time
  official fp32        the official implementation from a local checkout (``--official PATH``)
  ours fp32            avplugins SynchformerNet under ``torch.inference_mode``
  ours bf16 autocast   the same under ``torch.autocast(dtype=bfloat16)`` (AMX / AVX-512 BF16 on CPU)
  ours bf16 weights    a bfloat16 copy of the model on bfloat16 inputs (no per-call weight casts)
  ours fp32 compiled   ``--compile``: ``torch.compile`` (inductor, C++ kernels via gcc) with freezing
                       (weights become constants: oneDNN-prepacked, casts folded), fusing
                       LayerNorm / GELU / residual adds / casts around the matmuls
  ours bf16 compiled   ``--compile``: the same under ``torch.autocast(dtype=bfloat16)``
  ours bf16 weights compiled  ``--compile``: the bfloat16 copy, compiled the same way

Prints a table (seconds and clips per second, speed-up over the eager baseline and over the
official code from the best rounds and within each round (median and range), max |logit
difference| from ours fp32, whether the argmax agrees), the FLOPs of one clip
(``torch.utils.flop_counter`` on the meta device) and the floor they give at the measured
matmul peak. Rounds are interleaved (every variant once per round, the order reversed every
other round) so that load from other processes hits every variant alike. Compilation happens
in one untimed call before the rounds; its time is printed separately.

A clip is S segments of 16 frames x 224 px plus their log-mels (paper: S = 14). The towers
run per segment, so the time of a paper clip is ``14 / S`` times that of S segments;
``--segments`` smaller than 14 keeps a run short and the table also reports that scaling.

    python benchmarks/synchformer_inference.py --threads 2 --segments 2 --repeats 2 \
        [--official /path/to/Synchformer --official-deps /path/to/site-packages] \
        [--profile "ours bf16 weights"]     # where the time of one call goes, per operator and shape

The official code needs timm, einops, transformers and omegaconf; ``--official-deps`` puts a
folder holding them on ``sys.path`` for that variant only (torchvision, which timm imports but
Synchformer does not use, is stubbed). Not for CI.
"""
import argparse
import copy
import importlib.abc
import importlib.machinery
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Callable, Dict, List

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from avplugins.modules.synchformer_net import SynchformerNet  # noqa: E402
from benchmarks._eager_reference import EagerConfig, eager_synchformer  # noqa: E402

PAPER_SEGMENTS = 14


def clip_inputs(batch: int, segments: int, seed: int = 0):
    """Random normalised frames (B, S, 16, 3, 224, 224) and log-mels (B, S, 1, 128, 66)."""
    generator = torch.Generator().manual_seed(seed)
    video = torch.randn(batch, segments, 16, 3, 224, 224, generator=generator)
    audio = torch.randn(batch, segments, 1, 128, 66, generator=generator)
    return video, audio


def flops_per_clip(segments: int) -> float:
    """FLOPs of one forward of the paper-size model on one clip of ``segments`` segments."""
    with torch.device("meta"):
        net = SynchformerNet.build(num_segments=segments).eval()
        video, audio = clip_inputs_meta(segments)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        net(video, audio)
    return float(counter.get_total_flops())


def clip_inputs_meta(segments: int):
    return torch.empty(1, segments, 16, 3, 224, 224), torch.empty(1, segments, 1, 128, 66)


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 3) -> float:
    """Best FLOP/s of a (size x size) @ (size x size) matmul in ``dtype``."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


# ---------------------------------------------------------------- the official implementation
class _AnyAttribute(type):
    """A class whose every attribute is another such class: stands in for torchvision names
    that timm touches at import time."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _AnyAttribute(name, (), {})


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _AnyAttribute(name, (), {})


class _TorchvisionStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers every ``torchvision.*`` import with an empty stub (it cannot be imported here)."""

    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] == "torchvision":
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def randomise_official(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter from 0.02 N(0, 1), LayerNorm weights around 1 (the official init leaves
    several at zero, which would make attention uniform)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                value = 0.02 * torch.randn(param.shape, generator=generator)
                if isinstance(module, torch.nn.LayerNorm) and name == "weight":
                    value += 1
                param.copy_(value)


def build_official(checkout: str, deps: str, segments: int) -> torch.nn.Module:
    """The official stage-2 Synchformer (configs/sync.yaml, no pretrained towers), randomised."""
    sys.meta_path.insert(0, _TorchvisionStub())
    for path in (deps, checkout, f"{checkout}/model/modules/feat_extractors/visual"):
        if path:
            sys.path.insert(0, path)
    from omegaconf import OmegaConf
    from utils.utils import instantiate_from_config

    cfg = OmegaConf.load(f"{checkout}/configs/sync.yaml")
    cfg.data = {"num_off_cls": 21}
    params = cfg.model.params
    params.vfeat_extractor.params.ckpt_path = None
    params.afeat_extractor.params.ckpt_path = None
    tokens_per_segment = 8 + 6
    params.transformer.params.pos_emb_cfg.params.block_shape = [2 + segments * tokens_per_segment]
    model = instantiate_from_config(cfg.model).eval()
    randomise_official(model)
    return model


# ---------------------------------------------------------------------------------- running
def compiled_variant(net: torch.nn.Module, video, audio, autocast: bool):
    """``torch.compile(net)`` with inductor freezing, called once to compile on ``video``
    (B, S, 16, 3, 224, 224) and ``audio`` (B, S, 1, 128, 66) (in the model's dtype), under
    ``torch.autocast(dtype=bfloat16)`` when ``autocast``.

    Returns (run: () -> offset logits (B, n_offsets) float32, seconds the compiling call took).
    Freezing turns the weights into constants, so it needs ``inference_mode``/``no_grad`` and
    a model that is not trained afterwards."""
    compiled = torch.compile(net, options={"freezing": True})

    def run():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return compiled(video, audio)["offset_logits"].float()

    start = time.perf_counter()
    run()
    return run, time.perf_counter() - start


def time_rounds(variants: Dict[str, Callable[[], torch.Tensor]], repeats: int, warmup: int):
    """Run every variant once per round, in reverse order every other round so that a slow
    stretch of a loaded machine does not always hit the same variant.

    Returns ({name: [seconds per round]}, {name: logits})."""
    logits = {}
    for name, run in variants.items():
        for _ in range(warmup):
            logits[name] = run()
    seconds = {name: [] for name in variants}
    names = list(variants)
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            logits[name] = variants[name]()
            seconds[name].append(time.perf_counter() - start)
            print(f"  {name}: {seconds[name][-1]:.2f} s", flush=True)
    return seconds, logits


def round_ratios(baseline: List[float], variant: List[float]) -> str:
    """Speed-up of ``variant`` over ``baseline`` within each round (seconds of the same rounds):
    'median (min-max)', or '-' without a baseline."""
    if not baseline:
        return "-"
    ratios = sorted(base / own for base, own in zip(baseline, variant))
    return f"{statistics.median(ratios):.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f})"


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--segments", type=int, default=PAPER_SEGMENTS, help="segments per clip (paper: 14)")
    parser.add_argument("--batch", type=int, default=1, help="clips per forward")
    parser.add_argument("--repeats", type=int, default=1, help="timed rounds (best kept)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--official", help="checkout of github.com/v-iashin/Synchformer to compare with")
    parser.add_argument("--official-deps", default="", help="folder with timm, einops, transformers for --official")
    parser.add_argument("--compile", action="store_true",
                        help="add torch.compile (inductor, freezing) variants: fp32, bf16 autocast, bf16 weights")
    parser.add_argument("--no-eager", action="store_true", help="leave out the eager baseline")
    parser.add_argument("--profile", metavar="VARIANT",
                        help="after the table, torch.profiler's top operators (by input shape) in one "
                             "call of this variant, e.g. 'ours bf16 weights'")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    net = SynchformerNet.build(num_segments=args.segments).eval()
    official = None
    if args.official:
        from avplugins.convert.synchformer import checkpoint_filter_fn

        official = build_official(args.official, args.official_deps, args.segments)
        net.load_state_dict(checkpoint_filter_fn(official.state_dict()), strict=True)
    weights = net.state_dict()
    video, audio = clip_inputs(args.batch, args.segments)

    def ours():
        with torch.inference_mode():
            return net(video, audio)["offset_logits"]

    def ours_bf16():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return net(video, audio)["offset_logits"].float()

    net_bf16 = copy.deepcopy(net).to(torch.bfloat16)

    def ours_bf16_weights():
        with torch.inference_mode():
            return net_bf16(video.bfloat16(), audio.bfloat16())["offset_logits"].float()

    variants: Dict[str, Callable[[], torch.Tensor]] = {}
    if not args.no_eager:
        def eager():
            with torch.no_grad():
                return eager_synchformer(weights, video, audio, EagerConfig())
        variants["eager fp32"] = eager
    if official is not None:
        def official_fp32():
            with torch.no_grad():
                return official(video, audio)[1]
        variants["official fp32"] = official_fp32
    variants["ours fp32"] = ours
    variants["ours bf16 autocast"] = ours_bf16
    variants["ours bf16 weights"] = ours_bf16_weights
    compile_seconds = {}
    if args.compile:
        compiled_cases = (
            ("ours fp32 compiled", net, video, audio, False),
            ("ours bf16 compiled", net, video, audio, True),
            ("ours bf16 weights compiled", net_bf16, video.bfloat16(), audio.bfloat16(), False),
        )
        for name, model, video_in, audio_in, autocast in compiled_cases:
            variants[name], compile_seconds[name] = compiled_variant(model, video_in, audio_in, autocast)
            print(f"  {name}: first call (compiling) {compile_seconds[name]:.1f} s", flush=True)

    if args.profile is not None and args.profile not in variants:
        parser.error(f"--profile {args.profile!r}: not one of the variants {sorted(variants)}")
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch} clip(s) of "
          f"{args.segments} segments x 16 frames x 224 px", flush=True)
    rounds, logits = time_rounds(variants, args.repeats, args.warmup)
    best = {name: min(seconds) for name, seconds in rounds.items()}

    reference = logits["ours fp32"]
    base = best.get("eager fp32")
    base_official = best.get("official fp32")
    scale = PAPER_SEGMENTS / args.segments
    print()
    print(f"| variant | s / {args.segments}-segment clip | s / paper clip (x{scale:g}) | paper clips/s "
          "| vs eager | vs eager per round | vs official | vs official per round "
          "| max abs diff logits | argmax equal |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, seconds in best.items():
        per_clip = seconds / args.batch
        diff = (logits[name] - reference).abs().max().item()
        same = bool((logits[name].argmax(-1) == reference.argmax(-1)).all())
        vs_eager = f"{base / seconds:.2f}x" if base else "-"
        vs_official = f"{base_official / seconds:.2f}x" if base_official else "-"
        per_round_eager = round_ratios(rounds.get("eager fp32", []), rounds[name])
        per_round_official = round_ratios(rounds.get("official fp32", []), rounds[name])
        print(f"| {name} | {per_clip:.2f} | {per_clip * scale:.1f} | {1 / (per_clip * scale):.4f} | "
              f"{vs_eager} | {per_round_eager} | {vs_official} | {per_round_official} | {diff:.2e} | {same} |")
    for name, seconds in compile_seconds.items():
        print(f"compile time (first call, not in the table) {name}: {seconds:.1f} s")

    flops = flops_per_clip(PAPER_SEGMENTS)
    print()
    print(f"FLOPs per paper clip ({PAPER_SEGMENTS} segments): {flops / 1e12:.2f} TFLOP")
    for dtype, variant in ((torch.float32, "ours fp32"), (torch.bfloat16, "ours bf16 autocast")):
        peak = matmul_peak(dtype)
        floor = flops / peak
        measured = best[variant] / args.batch * scale
        print(f"{str(dtype).replace('torch.', '')}: matmul peak {peak / 1e9:.0f} GFLOP/s -> floor "
              f"{floor:.1f} s / clip; {variant} at {measured:.1f} s is {floor / measured:.0%} of it")
    if args.profile is not None:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            variants[args.profile]()
        print()
        print(f"{args.profile}, one call ({args.segments} segment(s)):")
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
