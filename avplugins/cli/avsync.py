"""``avsync``: audio-visual offset of videos with a Synchformer stage-2 model.

    avsync predict VIDEO... --checkpoint CKPT [--json F] [--plot F.png] [--fix OUT.mp4]
        [--window-stride 0.32] [--batch-size 16] [--device cuda|cpu] [--short-side N]
    avsync shift VIDEO OUT --offset SECONDS

``shift`` writes a copy whose audio is early by ``SECONDS`` (late when negative), the offset
``predict`` should then report: test material for your own videos.

Prints (or writes to --json) per video: every window's offset distribution, the estimate (the
argmax of their mean), its confidence and the top 3, the synchronizability probability when the
model has that head. A positive offset means the audio is early. --plot writes a heat map of
the offset probability over time, --fix a copy with the audio shifted into sync. With several
videos, --plot and --fix get the video's name as a suffix (``F_<video>.png``).

Exit status: 0 when every video was analysed, 2 when the checkpoint or any video could not be
(the message names the file; the other videos are still analysed and reported).
"""
import argparse
import json
import os
import re
import sys
from collections import Counter
from typing import List, Optional

import torch

from avplugins.checkpoint import UnsafeCheckpointError
from avplugins.data.media import MediaError, write_shifted_copy
from avplugins.sync_inference import (
    OFFSET_CONVENTION,
    SyncInputError,
    load_sync_model,
    plot_prediction,
    predict_video,
    window_stride_segments,
)

EXIT_ERROR = 2


def output_paths(template: Optional[str], videos: List[str]) -> List[Optional[str]]:
    """One output path per video from ``template``: the template itself for a single video,
    else ``<stem>_<video stem><ext>`` (plus ``_<n>`` when two videos share a stem)."""
    if template is None:
        return [None] * len(videos)
    if len(videos) == 1:
        return [template]
    stem, extension = os.path.splitext(template)
    names = [os.path.splitext(os.path.basename(video))[0] for video in videos]
    repeated = {name for name, count in Counter(names).items() if count > 1}
    return [
        f"{stem}_{name}_{index}{extension}" if name in repeated else f"{stem}_{name}{extension}"
        for index, name in enumerate(names)
    ]


_NUMBER = r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"
_MULTILINE_NUMBER_LIST = re.compile(rf"\[\s+({_NUMBER}(?:,\s+{_NUMBER})*)\s+\]")


def format_report(report: dict) -> str:
    """Indented JSON with every list of numbers on one line (one line per window's
    probabilities instead of one per number)."""
    text = json.dumps(report, indent=2)
    return _MULTILINE_NUMBER_LIST.sub(lambda match: "[" + " ".join(match.group(1).split()) + "]", text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avsync", description="Audio-visual synchronisation with Synchformer.")
    commands = parser.add_subparsers(dest="command", required=True)
    predict = commands.add_parser(
        "predict", help="estimate the audio-visual offset of videos",
        description="Estimate the audio-visual offset of whole videos. " + OFFSET_CONVENTION.capitalize() + ".",
    )
    predict.add_argument("videos", nargs="+", metavar="VIDEO", help="media files with audio and video (any container)")
    predict.add_argument("--checkpoint", required=True,
                         help="Synchformer stage-2 checkpoint (trained, or from avplugins-convert)")
    predict.add_argument("--json", metavar="F", help="write the JSON report here instead of stdout")
    predict.add_argument("--plot", metavar="F.png", help="heat map of the offset probability over time")
    predict.add_argument("--fix", metavar="OUT.mp4", help="write a copy with the audio shifted into sync")
    predict.add_argument("--window-stride", type=float, default=None, metavar="SECONDS",
                         help="seconds between windows, a multiple of the segment stride "
                              "(default: the segment stride, 0.32 s)")
    predict.add_argument("--batch-size", type=int, default=16, help="segments per tower call (default 16)")
    predict.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    predict.add_argument("--short-side", type=int, default=None,
                         help="resize frames to this short side before the centre crop "
                              "(default: the checkpoint's task.resize_short_side, else crop * 256 / 224)")
    predict.add_argument("--quiet", action="store_true", help="no progress bar and no summary lines on stderr")
    shift = commands.add_parser(
        "shift", help="write a copy with the audio moved by a known offset",
        description="Write a copy of VIDEO whose audio is early by --offset seconds (late when negative): "
                    "the offset `avsync predict` should report for it. Video packets are copied, the audio is "
                    "re-encoded.",
    )
    shift.add_argument("video", metavar="VIDEO", help="media file with audio and video")
    shift.add_argument("out", metavar="OUT", help="the copy to write (its extension picks the container)")
    shift.add_argument("--offset", type=float, required=True, metavar="SECONDS",
                       help="how early the audio of the copy is (negative: late)")
    return parser


def _error(message: str) -> None:
    print(f"avsync: error: {message}", file=sys.stderr)


def summary_line(prediction) -> str:
    """One human-readable line per video (stderr; the JSON is the full report)."""
    parts = []
    if prediction.estimate_s is not None:
        top = ", ".join(f"{offset:+.2f} s {p:.2f}" for offset, p in prediction.top_offsets(3))
        parts.append(f"offset {prediction.estimate_s:+.2f} s (confidence {prediction.confidence:.2f}; top 3: {top})")
    if prediction.sync_probability is not None:
        parts.append(f"synchronizable with probability {prediction.sync_probability:.2f}")
    return f"{prediction.path}: " + "; ".join(parts) + f" over {len(prediction.window_starts_s)} windows"


def predict_command(args) -> int:
    if args.batch_size < 1:
        _error(f"--batch-size must be >= 1, got {args.batch_size}")
        return EXIT_ERROR
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        _error(f"--device {device}: no CUDA device is available here; use --device cpu")
        return EXIT_ERROR
    try:
        model, settings = load_sync_model(args.checkpoint, device=device, short_side=args.short_side)
    except (OSError, UnsafeCheckpointError, SyncInputError) as error:
        _error(str(error))
        return EXIT_ERROR
    if args.fix and not settings.has_offset_head:
        _error(f"{args.checkpoint}: this model has only a synchronizability head, so it cannot tell the "
               "offset --fix needs")
        return EXIT_ERROR
    if args.window_stride is not None:
        try:
            window_stride_segments(args.window_stride, settings.layout)
        except ValueError as error:
            _error(f"--window-stride: {error}")
            return EXIT_ERROR
    report = {**settings.to_json(), "grid_s": list(settings.grid_s), "offset_convention": OFFSET_CONVENTION,
              "videos": []}
    status = 0
    plots, fixes = output_paths(args.plot, args.videos), output_paths(args.fix, args.videos)
    for video, plot_path, fix_path in zip(args.videos, plots, fixes):
        try:
            prediction = predict_video(
                model, settings, video, window_stride_s=args.window_stride, batch_size=args.batch_size,
                progress=not args.quiet,
            )
            result = prediction.to_json()
            if not args.quiet:
                print(summary_line(prediction), file=sys.stderr)
            if plot_path:
                plot_prediction(prediction, plot_path)
                result["plot"] = plot_path
            if fix_path:
                write_shifted_copy(video, fix_path, delay_s=prediction.estimate_s)
                result["fixed"] = {"path": fix_path, "audio_delay_s": prediction.estimate_s}
        except (MediaError, ValueError, OSError) as error:  # SyncInputError is a ValueError
            _error(str(error))
            result = {"path": video, "error": str(error)}
            status = EXIT_ERROR
        report["videos"].append(result)
    text = format_report(report)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
    else:
        print(text)
    return status


def shift_command(args) -> int:
    try:
        # audio early by e is audio advanced by e: a delay of -e
        write_shifted_copy(args.video, args.out, -args.offset)
    except (MediaError, ValueError) as error:
        _error(str(error))
        return EXIT_ERROR
    print(f"{args.out}: audio early by {args.offset:+.2f} s relative to {args.video}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return shift_command(args) if args.command == "shift" else predict_command(args)


if __name__ == "__main__":
    sys.exit(main())
