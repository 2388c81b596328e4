"""Write the fixed offsets of Synchformer's validation/test sets, once, seeded.

``python -m preprocess.sync_offsets DATA --splits valid test --seed 0`` reads
``DATA/{split}.tsv`` and writes ``DATA/{split}_offsets.csv`` (``id,offset_sec,vstart_sec``: the
official repo's columns) with an offset drawn uniformly from the grid and a video crop start
that keeps both crops inside the clip. ``--synchronizability`` makes half of the offsets
+-the segment span (unsynchronizable), as in the synchronizability fine-tune.
Clips too short for a crop are reported and left out (the dataset then refuses them by name).
"""
import argparse
import logging
import os
import zlib

import numpy as np

from avplugins.data.manifest import read_manifest
from avplugins.data.sync_dataset import FixedOffset, write_fixed_offsets
from avplugins.data.sync_sampling import SegmentLayout, offset_grid, sample_video_start_frame

logger = logging.getLogger("preprocess.sync_offsets")


def draw_fixed_offsets(
    entries, grid, crop_frames, layout: SegmentLayout, seed: int, split: str, synchronizability: bool
):
    """{clip id: FixedOffset} for the entries whose length allows a crop, and the skipped
    (id, reason) pairs. Each clip's draw depends only on (seed, split name, clip index)."""
    offsets, skipped = {}, []
    no_overlap_s = layout.span_s
    for index, entry in enumerate(entries):
        rng = np.random.default_rng((seed, zlib.crc32(split.encode()), index))
        if synchronizability and rng.random() >= 0.5:
            offset_s = float(rng.choice([-no_overlap_s, no_overlap_s]))
        else:
            offset_s = float(rng.choice(grid))
        try:
            start = sample_video_start_frame(entry.num_video_frames, crop_frames, offset_s, layout.video_fps, rng)
        except ValueError as error:
            skipped.append((entry.id, str(error)))
            continue
        offsets[entry.id] = FixedOffset(offset_s, start / layout.video_fps)
    return offsets, skipped


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="folder with {split}.tsv manifests")
    parser.add_argument("--splits", nargs="+", default=["valid", "test"])
    parser.add_argument("--out-dir", default=None, help="where to write (default: the data folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--crop-s", type=float, default=5.0)
    parser.add_argument("--max-offset-s", type=float, default=2.0)
    parser.add_argument("--num-offset-classes", type=int, default=21)
    parser.add_argument("--num-segments", type=int, default=14)
    parser.add_argument("--segment-frames", type=int, default=16)
    parser.add_argument("--segment-stride-frames", type=int, default=8)
    parser.add_argument("--video-fps", type=int, default=25)
    parser.add_argument("--synchronizability", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    layout = SegmentLayout(args.num_segments, args.segment_frames, args.segment_stride_frames, args.video_fps)
    grid = offset_grid(args.max_offset_s, args.num_offset_classes)
    crop_frames = int(round(args.crop_s * args.video_fps))
    out_dir = args.out_dir or args.data
    os.makedirs(out_dir, exist_ok=True)
    for split in args.splits:
        _, entries = read_manifest(os.path.join(args.data, f"{split}.tsv"))
        offsets, skipped = draw_fixed_offsets(
            entries, grid, crop_frames, layout, seed=args.seed, split=split,
            synchronizability=args.synchronizability,
        )
        path = os.path.join(out_dir, f"{split}_offsets.csv")
        write_fixed_offsets(path, offsets)
        for clip_id, reason in skipped:
            logger.warning("%s: left out: %s", clip_id, reason)
        logger.info("%s: %d fixed offsets written to %s (%d clips too short)", split, len(offsets), path, len(skipped))


if __name__ == "__main__":
    main()
