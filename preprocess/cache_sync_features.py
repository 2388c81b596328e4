"""Synchformer caches: clips decoded once, and the frozen towers' features for stage 2.

    python -m preprocess.cache_sync_features decode DATA DECODED --splits train valid --resize-short-side 32
    python -m preprocess.cache_sync_features features STAGE1.pt DATA CACHE --splits train valid [--decoded DECODED]

``decode`` writes every clip of ``DATA/{split}.tsv`` decoded whole (25 fps RGB frames, scaled
so that the short side has ``--resize-short-side`` pixels, and 16 kHz audio): a training task
with ``task.decoded_clips=DECODED`` slices its windows from it instead of decoding the files
again at every epoch (the task's ``resize_short_side`` must be the same).

``features`` runs the towers of ``STAGE1.pt`` (a stage-1 or stage-2 checkpoint of ours) on the
segments starting at every frame of every clip, with the video settings of the checkpoint's
task (centre crop), and writes ``CACHE``; stage 2 trains on it with ``task.feature_cache=CACHE
model.pretrained_towers=STAGE1.pt`` and refuses a cache made by other towers or settings.
Layouts: ``avplugins/data/sync_feature_cache.py``.
"""
import argparse
import logging
import os
import time
from typing import Optional

import torch
from omegaconf import OmegaConf

from avplugins.checkpoint import load_checkpoint_state, load_model
from avplugins.data.sync_dataset import AVClipDataset, ClipSamplingConfig
from avplugins.data.sync_feature_cache import (
    CacheMeta,
    DecodedClips,
    build_feature_cache,
    tower_fingerprint,
    write_decoded_clips,
)
from avplugins.data.sync_sampling import SegmentLayout

logger = logging.getLogger("preprocess.cache_sync_features")


def clip_reader(
    manifest_path: str, segment_frames: int = 16, video_fps: int = 25, sample_rate: int = 16000,
    crop_size: int = 224, resize_short_side: Optional[int] = None, decoded_clips: Optional[DecodedClips] = None,
) -> AVClipDataset:
    """Reads the clips of a manifest as at test time (centre crop)."""
    layout = SegmentLayout(
        num_segments=1, segment_frames=segment_frames, stride_frames=segment_frames,
        video_fps=video_fps, sample_rate=sample_rate,
    )
    config = ClipSamplingConfig(layout=layout, crop_size=crop_size, resize_short_side=resize_short_side)
    return AVClipDataset(manifest_path, config, train=False, decoded_clips=decoded_clips)


def decode(args) -> None:
    for split in args.splits:
        started = time.perf_counter()
        reader = clip_reader(
            os.path.join(args.data, f"{split}.tsv"), video_fps=args.video_fps, sample_rate=args.sample_rate,
            resize_short_side=args.resize_short_side,
        )
        skipped = write_decoded_clips(reader, args.out, split)
        report(split, reader, skipped, started, args.out)


def features(args) -> None:
    task_cfg = OmegaConf.create(load_checkpoint_state(args.checkpoint)["cfg"]).task
    model = load_model(args.checkpoint, device=args.device)
    visual, audio = model.net.visual, model.net.audio
    meta = CacheMeta(
        segment_frames=task_cfg.segment_frames, video_fps=task_cfg.video_fps, sample_rate=task_cfg.sample_rate,
        crop_size=task_cfg.crop_size, resize_short_side=task_cfg.resize_short_side,
        tower_fingerprint=tower_fingerprint(visual, audio), source_checkpoint=os.path.abspath(args.checkpoint),
        video_tokens=visual.tokens_per_segment, video_dim=visual.dim,
        audio_tokens=audio.tokens_per_segment, audio_dim=audio.dim,
    )
    for split in args.splits:
        started = time.perf_counter()
        decoded = DecodedClips(args.decoded, split) if args.decoded else None
        if decoded is not None and decoded.meta.resize_short_side != task_cfg.resize_short_side:
            raise ValueError(
                f"{args.decoded} was decoded with resize_short_side={decoded.meta.resize_short_side}, the "
                f"checkpoint's task uses {task_cfg.resize_short_side}"
            )
        reader = clip_reader(
            os.path.join(args.data, f"{split}.tsv"), task_cfg.segment_frames, task_cfg.video_fps,
            task_cfg.sample_rate, task_cfg.crop_size, task_cfg.resize_short_side, decoded,
        )
        skipped = build_feature_cache(
            visual, audio, reader, args.out, split, meta, batch_segments=args.batch_segments, device=args.device
        )
        report(split, reader, skipped, started, args.out)


def report(split: str, reader: AVClipDataset, skipped, started: float, out: str) -> None:
    for clip_id, reason in skipped:
        logger.warning("%s: left out: %s", clip_id, reason)
    logger.info("%s: %d clips written to %s in %.1f s (%d left out)", split, len(reader) - len(skipped), out,
                time.perf_counter() - started, len(skipped))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    decode_parser = commands.add_parser("decode", help="decode clips once")
    decode_parser.add_argument("data", help="folder with {split}.tsv manifests")
    decode_parser.add_argument("out", help="output folder")
    decode_parser.add_argument("--resize-short-side", type=int, default=None, help="as the task's resize_short_side")
    decode_parser.add_argument("--video-fps", type=int, default=25)
    decode_parser.add_argument("--sample-rate", type=int, default=16000)
    decode_parser.set_defaults(run=decode)
    features_parser = commands.add_parser("features", help="cache tower features for stage 2")
    features_parser.add_argument("checkpoint", help="stage-1 (or stage-2) checkpoint whose towers compute them")
    features_parser.add_argument("data", help="folder with {split}.tsv manifests")
    features_parser.add_argument("out", help="output folder")
    features_parser.add_argument("--decoded", default=None, help="read the clips from this `decode` output")
    features_parser.add_argument("--batch-segments", type=int, default=128, help="segments per tower forward")
    features_parser.add_argument("--device", default="cpu")
    features_parser.set_defaults(run=features)
    for command in (decode_parser, features_parser):
        command.add_argument("--splits", nargs="+", default=["train", "valid"])
        command.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.run(args)


if __name__ == "__main__":
    main()
