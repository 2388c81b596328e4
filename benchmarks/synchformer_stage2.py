"""Synchformer stage 2: time per update with the frozen towers recomputed at every step versus
read from the feature cache (``avplugins.data.sync_feature_cache``), side by side in one process.

Both paths do the same update of the trainable part (projections + sync module: forward,
cross-entropy over the offset classes, backward, Adam step) on the same batch:
  recompute   towers (eval, no grad) on the clips' frames and log-mels, then the update
  cache       gather the rows of every segment from a real memory-mapped float16 cache
              (written here from the same towers on the same inputs), then the update
Decoding and augmenting the clips, which the recompute path also needs, is NOT timed: the
speedup is a lower bound. The losses of the two paths differ only by the float16 rounding of
the cached features; the table prints that difference. Also prints the cache's disk use per
hour of video (one row per video frame, since segments may start at any frame).

    python benchmarks/synchformer_stage2.py --size tiny --threads 2
    python benchmarks/synchformer_stage2.py --size base --batch 1 --segments 14 --repeats 1
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import List

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from avplugins.data.sync_feature_cache import CacheMeta, FeatureCache, tower_fingerprint  # noqa: E402
from avplugins.modules.synchformer_net import SynchformerNet  # noqa: E402

FPS, SAMPLE_RATE, SEGMENT_FRAMES, STRIDE_FRAMES = 25, 16000, 16, 8
SIZES = {
    # the towers of the synchformer_tiny variant / the paper's
    "tiny": dict(visual_args=dict(dim=64, depth=2, num_heads=4), audio_args=dict(dim=64, depth=2, num_heads=4),
                 sync_args=dict(dim=64, depth=2, num_heads=4)),
    "base": {},
}


def build(size: str, segments: int, image_size: int) -> SynchformerNet:
    args = {key: dict(value) for key, value in SIZES[size].items()}
    args.setdefault("visual_args", {})["image_size"] = image_size
    net = SynchformerNet.build(num_segments=segments, **args)
    for tower in (net.visual, net.audio):
        tower.requires_grad_(False).eval()
    return net


def write_cache(net: SynchformerNet, video: torch.Tensor, audio: torch.Tensor, cache_dir: str, image_size: int):
    """Cache the towers' features of every segment of the batch, one clip per cache entry
    whose rows are its segments (start frames 0, 8, 16, ...: the stride of the clip)."""
    with torch.inference_mode():
        vfeats, afeats = net.forward_features(video, audio)  # (B, S, t, D)
    batch, segments = vfeats.shape[:2]
    meta = CacheMeta(SEGMENT_FRAMES, FPS, SAMPLE_RATE, image_size, None, tower_fingerprint(net.visual, net.audio),
                     "benchmark", vfeats.shape[2], vfeats.shape[3], afeats.shape[2], afeats.shape[3])
    np.save(os.path.join(cache_dir, "train.video.npy"), vfeats.flatten(0, 1).numpy().astype(np.float16))
    np.save(os.path.join(cache_dir, "train.audio.npy"), afeats.flatten(0, 1).numpy().astype(np.float16))
    with open(os.path.join(cache_dir, "train.index.tsv"), "w", encoding="utf-8") as handle:
        handle.write("id\tfirst_row\tnum_starts\n")
        for clip in range(batch):
            handle.write(f"clip{clip}\t{clip * segments}\t{segments}\n")
    meta.save(cache_dir)
    return meta


def disk_bytes_per_hour(meta: CacheMeta) -> float:
    """float16 bytes of one cache row (video + audio features of one segment start) x one row
    per video frame of an hour."""
    row_bytes = 2 * (meta.video_tokens * meta.video_dim + meta.audio_tokens * meta.audio_dim)
    return row_bytes * meta.video_fps * 3600


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--batch", type=int, default=4, help="clips per update")
    parser.add_argument("--segments", type=int, default=14)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3, help="timed updates per path after one untimed (best kept)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    net = build(args.size, args.segments, args.image_size)
    generator = torch.Generator().manual_seed(0)
    video = torch.randn(args.batch, args.segments, SEGMENT_FRAMES, 3, args.image_size, args.image_size,
                        generator=generator)
    audio = torch.randn(args.batch, args.segments, 1, 128, 66, generator=generator)
    targets = torch.randint(0, 21, (args.batch,), generator=generator)
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-6, eps=1e-7)
    initial = {name: p.detach().clone() for name, p in net.named_parameters() if p.requires_grad}

    def update(vfeats: torch.Tensor, afeats: torch.Tensor) -> float:
        loss = F.cross_entropy(net.forward_head(vfeats, afeats)["offset_logits"], targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    def recompute() -> float:
        with torch.no_grad():
            vfeats, afeats = net.forward_features(video, audio)
        return update(vfeats, afeats)

    with tempfile.TemporaryDirectory() as cache_dir:
        meta = write_cache(net, video, audio, cache_dir, args.image_size)
        cache = FeatureCache(cache_dir, "train")
        starts = np.arange(args.segments)

        def cached() -> float:
            rows = [cache.gather(f"clip{clip}", starts, starts) for clip in range(args.batch)]
            return update(torch.stack([v for v, _ in rows]), torch.stack([a for _, a in rows]))

        paths = {"recompute towers": recompute, "feature cache": cached}
        best, first_loss = {}, {}
        for name, step in paths.items():
            with torch.no_grad():  # every path starts from the same weights and optimizer state
                for param_name, param in net.named_parameters():
                    if param.requires_grad:
                        param.copy_(initial[param_name])
            optimizer.state.clear()
            torch.manual_seed(1)  # the same dropout masks in the sync module
            first_loss[name] = step()  # warm-up, untimed
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
            best[name] = min(times)
            print(f"  {name}: {', '.join(f'{t:.3f}' for t in times)} s", flush=True)
        cache_bytes = sum(os.path.getsize(os.path.join(cache_dir, f"train.{kind}.npy")) for kind in ("video", "audio"))

    print(f"\n{args.size} towers, batch {args.batch} clips x {args.segments} segments x {SEGMENT_FRAMES} frames x "
          f"{args.image_size} px, torch {torch.__version__}, {args.threads} threads")
    print("| path | s / update | speedup | loss of the first update |")
    print("|---|---|---|---|")
    for name, seconds in best.items():
        print(f"| {name} | {seconds:.3f} | {best['recompute towers'] / seconds:.1f}x | {first_loss[name]:.6f} |")
    per_hour = disk_bytes_per_hour(meta)
    print(f"\ncache rows: video {meta.video_tokens} x {meta.video_dim}, audio {meta.audio_tokens} x {meta.audio_dim} "
          f"float16 = {per_hour / (FPS * 3600):.0f} bytes per segment start")
    print(f"disk per hour of video (one row per frame at {FPS} fps): {per_hour / 1e9:.2f} GB "
          f"(this run's cache: {cache_bytes} bytes for {args.batch * args.segments} rows)")


if __name__ == "__main__":
    main()
