"""Cache the frozen towers' features of every clip and segment start, for Synchformer stage 2.

    python -m preprocess.cache_sync_features STAGE1.pt DATA CACHE --splits train valid

reads ``DATA/{split}.tsv``, runs the towers of ``STAGE1.pt`` (a stage-1 or stage-2 checkpoint
of ours) on the segments starting at every frame of every clip, with the video input settings
(crop, resize, segment length) of the checkpoint's task, and writes ``CACHE`` (layout in
``avplugins/data/sync_feature_cache.py``). Then train stage 2 on it with
``task.feature_cache=CACHE model.pretrained_towers=STAGE1.pt``; the task refuses a cache made by
other towers or with other input settings.
"""
import argparse
import logging
import os
import time

import torch
from omegaconf import OmegaConf

from avplugins.checkpoint import load_checkpoint_state, load_model
from avplugins.data.sync_dataset import AVClipDataset, ClipSamplingConfig
from avplugins.data.sync_feature_cache import CacheMeta, build_feature_cache, tower_fingerprint
from avplugins.data.sync_sampling import SegmentLayout

logger = logging.getLogger("preprocess.cache_sync_features")


def clip_reader(manifest_path: str, task_cfg) -> AVClipDataset:
    """Decodes the clips of a manifest with a checkpoint's video settings, as at test time."""
    layout = SegmentLayout(
        num_segments=1, segment_frames=task_cfg.segment_frames, stride_frames=task_cfg.segment_frames,
        video_fps=task_cfg.video_fps, sample_rate=task_cfg.sample_rate,
    )
    config = ClipSamplingConfig(layout=layout, crop_size=task_cfg.crop_size, resize_short_side=task_cfg.resize_short_side)
    return AVClipDataset(manifest_path, config, train=False)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="stage-1 (or stage-2) checkpoint whose towers compute the features")
    parser.add_argument("data", help="folder with {split}.tsv manifests")
    parser.add_argument("cache", help="output folder")
    parser.add_argument("--splits", nargs="+", default=["train", "valid"])
    parser.add_argument("--batch-segments", type=int, default=128, help="segments per tower forward")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

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
        reader = clip_reader(os.path.join(args.data, f"{split}.tsv"), task_cfg)
        skipped = build_feature_cache(
            visual, audio, reader, args.cache, split, meta, batch_segments=args.batch_segments, device=args.device
        )
        for clip_id, reason in skipped:
            logger.warning("%s: left out: %s", clip_id, reason)
        logger.info("%s: %d clips cached in %.1f s (%d left out) -> %s", split, len(reader) - len(skipped),
                    time.perf_counter() - started, len(skipped), args.cache)


if __name__ == "__main__":
    main()
