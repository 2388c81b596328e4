"""Synchformer's two input kernels against their straightforward versions, side by side in one
process, with the largest difference of the outputs:

- patch embedding: ``nn.Conv3d`` / ``nn.Conv2d`` with stride == kernel versus
  ``avplugins.modules.patch_embed.embed_patches`` (one matrix product), at the paper's
  Motionformer size (forward, inference) and for the tiny towers of the CPU recipes (forward +
  backward of the weights, as in stage-1 training);
- log-mel inputs of overlapping audio segments: one STFT per segment
  (``synchformer_audio_features``) versus shared STFT frames (``synchformer_audio_features_at``),
  for segments at every video frame of a 10 s clip (the feature cache) and for the paper's 14
  segments with 50 % overlap (a stage-2 item, an ``avsync predict`` window).

    python benchmarks/synchformer_kernels.py --threads 1 --repeats 5
"""
import argparse
import sys
from pathlib import Path
from typing import Callable, List

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from avplugins.data.features import (  # noqa: E402
    SEGMENT_SAMPLES,
    synchformer_audio_features,
    synchformer_audio_features_at,
)
from avplugins.modules.patch_embed import embed_patches  # noqa: E402
from _bench_utils_d2v import best_seconds  # noqa: E402

SAMPLES_PER_FRAME = 640  # 16 kHz audio per 25 fps frame


def best_ms(function: Callable[[], torch.Tensor], repeats: int) -> float:
    """Best wall time of ``function()`` over ``repeats`` runs after one warm-up, in ms."""
    return 1e3 * best_seconds(function, repeats)


def patch_rows(repeats: int) -> List[tuple]:
    rows = []
    torch.manual_seed(0)
    # paper: one clip, 14 segments of 16 frames at 224 x 224, 2 x 16 x 16 tubelets, D = 768
    conv = nn.Conv3d(3, 768, kernel_size=(2, 16, 16), stride=(2, 16, 16))
    clips = torch.randn(14, 3, 16, 224, 224)
    with torch.inference_mode():
        reference, fast = conv(clips), embed_patches(clips, conv)
        rows.append((
            "Motionformer tubelets, paper size, 1 clip, forward",
            best_ms(lambda: conv(clips), repeats),
            best_ms(lambda: embed_patches(clips, conv), repeats),
            (reference - fast).abs().max().item(),
        ))
    # tiny recipe: 16 clips x 8 segments of 16 frames at 32 x 32, one 16 x 16 x 16 tubelet, D = 64
    conv = nn.Conv3d(3, 64, kernel_size=16, stride=16)
    clips = torch.randn(128, 3, 16, 32, 32)

    def train_step(embed):
        conv.zero_grad()
        embed().square().mean().backward()
        return conv.weight.grad

    reference_grad = train_step(lambda: conv(clips)).clone()
    fast_grad = train_step(lambda: embed_patches(clips, conv)).clone()
    rows.append((
        "tiny tubelets (stage-1 batch), forward + backward",
        best_ms(lambda: train_step(lambda: conv(clips)), repeats),
        best_ms(lambda: train_step(lambda: embed_patches(clips, conv)), repeats),
        (reference_grad - fast_grad).abs().max().item(),
    ))
    return rows


def audio_rows(repeats: int) -> List[tuple]:
    samples = torch.from_numpy(np.random.default_rng(0).standard_normal(160000).astype(np.float32) * 0.1)
    layouts = {
        "log-mels, segments at every frame of a 10 s clip": torch.arange(
            0, samples.numel() - SEGMENT_SAMPLES + 1, SAMPLES_PER_FRAME
        ),
        "log-mels, 14 segments with 50 % overlap": torch.arange(14) * (SEGMENT_SAMPLES // 2),
    }
    rows = []
    for name, starts in layouts.items():
        index = starts[:, None] + torch.arange(SEGMENT_SAMPLES)
        with torch.inference_mode():
            reference = synchformer_audio_features(samples[index])
            fast = synchformer_audio_features_at(samples, starts)
            rows.append((
                f"{name} ({len(starts)} segments)",
                best_ms(lambda: synchformer_audio_features(samples[index]), repeats),
                best_ms(lambda: synchformer_audio_features_at(samples, starts), repeats),
                (reference - fast).abs().max().item(),
            ))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = patch_rows(args.repeats) + audio_rows(args.repeats)
    print(f"torch {torch.__version__}, {args.threads} thread(s), best of {args.repeats}")
    print("| kernel | straightforward ms | ours ms | speedup | max abs difference |")
    print("|---|---|---|---|---|")
    for name, baseline_ms, ours_ms, difference in rows:
        print(f"| {name} | {baseline_ms:.1f} | {ours_ms:.1f} | {baseline_ms / ours_ms:.2f}x | {difference:.1e} |")


if __name__ == "__main__":
    main()
