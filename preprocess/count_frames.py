"""Recount a manifest's ``num_video_frames`` (25 fps) and ``num_audio_samples`` (16 kHz)
by decoding every clip.

    python -m preprocess.count_frames DATA/train.tsv --in-place
    python -m preprocess.count_frames DATA/train.tsv --out OTHER/train.tsv [--skip-invalid]

With ``--skip-invalid`` undecodable clips are dropped (and reported). The sibling ``.wrd``,
if any, is copied beside a new output (``OTHER/train.wrd``), with the same rows dropped.
"""
import argparse
import logging
import os
from typing import List, Optional, Tuple

from tqdm import tqdm

from avplugins.data.manifest import (ManifestEntry, ManifestError, count_media, read_labels, read_manifest,
                                     select_labels, write_labels, write_manifest)
from avplugins.data.media import MediaError

logger = logging.getLogger(__name__)


def recount(entries: List[ManifestEntry], skip_invalid: bool = False) -> Tuple[List[ManifestEntry], List[str]]:
    """(entries with decoded counts, problems): each entry's counts replaced by decoding its
    files. An undecodable file raises ``MediaError``, or with ``skip_invalid`` drops the entry."""
    recounted, problems = [], []
    for entry in tqdm(entries, desc="counting frames", unit="clip"):
        try:
            num_video_frames, num_audio_samples = count_media(entry.video_path, entry.audio_path)
        except MediaError as e:
            if not skip_invalid:
                raise
            problems.append(f"line {entry.line_number} ({entry.id}): {e}")
            continue
        recounted.append(ManifestEntry(entry.id, entry.video_path, entry.audio_path,
                                       num_video_frames, num_audio_samples, entry.line_number))
    return recounted, problems


def _root_line(tsv_path: str) -> str:
    with open(tsv_path, encoding="utf-8") as f:
        return f.readline().strip()


def recount_manifest(tsv_path: str, out_path: str, skip_invalid: bool = False) -> List[str]:
    """Write ``tsv_path`` with recounted columns to ``out_path`` (may be the same file);
    returns the problems skipped. The root line is kept when the output sits in the same
    folder (a relative root stays valid), else written absolute."""
    root, entries = read_manifest(tsv_path)
    wrd_path = os.path.splitext(tsv_path)[0] + ".wrd"
    labels = read_labels(wrd_path, len(entries), tsv_path) if os.path.isfile(wrd_path) else None
    recounted, problems = recount(entries, skip_invalid)
    same_folder = os.path.dirname(os.path.abspath(out_path)) == os.path.dirname(os.path.abspath(tsv_path))
    write_manifest(out_path, _root_line(tsv_path) if same_folder else root, recounted)
    if labels is not None and (problems or os.path.abspath(out_path) != os.path.abspath(tsv_path)):
        write_labels(os.path.splitext(out_path)[0] + ".wrd", select_labels(recounted, labels))
    if problems:
        logger.warning("skipped %d clip(s) of %s:\n  %s", len(problems), tsv_path, "\n  ".join(problems))
    return problems


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", help="a {split}.tsv manifest")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--in-place", action="store_true", help="overwrite the manifest")
    target.add_argument("--out", help="write the recounted manifest here")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="drop clips that cannot be decoded (reported) instead of failing")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    out_path = args.manifest if args.in_place else args.out
    try:
        problems = recount_manifest(args.manifest, out_path, args.skip_invalid)
    except ManifestError as e:
        raise SystemExit(f"error: {e}") from e
    except MediaError as e:
        raise SystemExit(f"error: {e}. Or pass --skip-invalid to drop such clips") from e
    print(f"wrote {out_path}" + (f"; skipped {len(problems)} clip(s)" if problems else ""))


if __name__ == "__main__":
    main()
