"""Write AV-HuBERT manifests (``{split}.tsv`` + ``{split}.wrd``) for a folder of clips.

Every video (.mp4 .mkv .avi .mov .webm) under SOURCE is a clip; a ``.wav`` with the same
name beside it is its audio (else the video's own audio track; neither = video only), and
a ``.wav`` alone is an audio-only clip. A ``.txt`` with the same name is its transcript:
LRS3 style (first line ``Text:  WORDS ...``) or plain text. Transcripts are lowercased and
punctuation other than apostrophes is removed (dashes separate words). When any clip has a
transcript every clip needs one, and ``.wrd`` files are written.

Clip ids are paths relative to SOURCE without extension; the manifests' root is SOURCE.
Counts: video frames at 25 fps, audio samples at 16 kHz, by decoding.

    python -m preprocess.make_manifest SOURCE --out DIR [--fractions 0.9,0.05,0.05] [--seed 0]
    python -m preprocess.make_manifest SOURCE --out DIR --split-by-dir   # SOURCE/{train,valid,test}/...
"""
import argparse
import logging
import os
import unicodedata
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

import numpy as np
from tqdm import tqdm

from avplugins.data import media
from avplugins.data.manifest import ManifestEntry, count_media, write_labels, write_manifest

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".avi", ".mov", ".webm")
AUDIO_EXTENSION = ".wav"
TRANSCRIPT_EXTENSION = ".txt"
SPLITS = ("train", "valid", "test")
LRS3_TEXT_PREFIX = "Text:"
T = TypeVar("T")


class InvalidClip(ValueError):
    """A clip that cannot go into a manifest; the message names the file and the problem."""


@dataclass(frozen=True)
class Clip:
    """A clip found on disk: absolute paths (None when absent)."""

    id: str
    video_path: Optional[str]
    audio_path: Optional[str]  # a sibling .wav; None = the video's own track, if any
    transcript_path: Optional[str]


def normalize_transcript(text: str) -> str:
    """Lowercase; drop punctuation except apostrophes (typographic ones become ``'``);
    dashes become spaces; collapse whitespace. ``"Well-known, isn’t it?"`` ->
    ``"well known isn't it"``."""
    characters = []
    for character in text.replace("\u2019", "'").lower():
        category = unicodedata.category(character)
        if category == "Pd":
            characters.append(" ")
        elif not category.startswith("P") or character == "'":
            characters.append(character)
    return " ".join("".join(characters).split())


def read_transcript(path: str) -> str:
    """Normalised transcript of an LRS3 ``.txt`` (``Text:`` line) or a plain text file
    (all lines joined)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise InvalidClip(f"{path}: transcript is not valid UTF-8 ({e.reason}); re-save it as UTF-8") from e
    if lines and lines[0].startswith(LRS3_TEXT_PREFIX):
        lines = [lines[0][len(LRS3_TEXT_PREFIX):]]
    transcript = normalize_transcript(" ".join(lines))
    if not transcript:
        raise InvalidClip(f"{path}: empty transcript; write the words spoken or remove the file")
    return transcript


def _without_extension(path: str) -> str:
    return os.path.splitext(path)[0]


def find_clips(source: str) -> Tuple[List[Clip], List[str]]:
    """(clips sorted by id, problems) for every video / lone .wav under ``source``; two
    videos with the same name but different extensions are a problem (ambiguous id)."""
    source = os.path.abspath(source)
    videos: Dict[str, str] = {}
    wavs, texts, problems = {}, set(), []
    for folder, _, names in os.walk(source):
        for name in names:
            path = os.path.join(folder, name)
            stem, extension = _without_extension(path), os.path.splitext(name)[1].lower()
            if extension in VIDEO_EXTENSIONS:
                if stem in videos:
                    problems.append(f"{path}: same name as {videos[stem]}; rename one (clip ids must be unique)")
                videos.setdefault(stem, path)
            elif extension == AUDIO_EXTENSION:
                wavs[stem] = path
            elif extension == TRANSCRIPT_EXTENSION:
                texts.add(stem)
    clips = []
    for stem in sorted(set(videos) | set(wavs)):
        clip_id = os.path.relpath(stem, source).replace(os.sep, "/")
        transcript = stem + TRANSCRIPT_EXTENSION if stem in texts else None
        clips.append(Clip(clip_id, videos.get(stem), wavs.get(stem), transcript))
    return clips, sorted(problems)


def _decoded(path: str, decode: Callable[[str], T]) -> T:
    """``decode(path)``, with a decoding failure (its message names ``path``) as ``InvalidClip``."""
    try:
        return decode(path)
    except media.MediaError as e:
        raise InvalidClip(str(e)) from e


def count_clip(clip: Clip) -> ManifestEntry:
    """Manifest entry of a clip, counts by decoding (25 fps frames, 16 kHz samples).
    Raises ``InvalidClip`` naming a file that cannot be decoded or holds no frames."""
    audio_path = clip.audio_path
    if audio_path is None and _decoded(clip.video_path, media.probe).has_audio:
        audio_path = clip.video_path
    num_video_frames = _decoded(clip.video_path, lambda p: count_media(p, None)[0]) if clip.video_path else 0
    num_audio_samples = _decoded(audio_path, lambda p: count_media(None, p)[1]) if audio_path else 0
    if clip.video_path and num_video_frames == 0:
        raise InvalidClip(f"{clip.video_path}: no video frames")
    if not clip.video_path and num_audio_samples == 0:
        raise InvalidClip(f"{audio_path}: no audio samples")
    return ManifestEntry(clip.id, clip.video_path, audio_path, num_video_frames, num_audio_samples)


def split_by_fraction(ids: Sequence[str], fractions: Sequence[float], seed: int) -> Dict[str, List[str]]:
    """Seeded random split of ``ids`` into train/valid/test by ``fractions`` (summing to 1).
    Each split with a fraction > 0 gets at least one id when there are enough; train takes
    the rest. Ids keep their input order within a split."""
    order = np.random.default_rng(seed).permutation(len(ids))
    sizes = {split: int(round(len(ids) * fraction)) for split, fraction in zip(SPLITS[1:], fractions[1:])}
    for split, fraction in zip(SPLITS[1:], fractions[1:]):
        if fraction > 0 and sizes[split] == 0 and len(ids) > sum(sizes.values()) + (fractions[0] > 0):
            sizes[split] = 1
    assignment, start = {}, 0
    for split in SPLITS[1:]:
        for index in order[start:start + sizes[split]]:
            assignment[index] = split
        start += sizes[split]
    return {split: [i for n, i in enumerate(ids) if assignment.get(n, "train") == split] for split in SPLITS}


def split_by_directory(ids: Sequence[str]) -> Dict[str, List[str]]:
    """Splits named by each id's top folder (``train/spk/clip`` -> ``train``)."""
    splits: Dict[str, List[str]] = {}
    for clip_id in ids:
        if "/" not in clip_id:
            raise InvalidClip(f"{clip_id}: with --split-by-dir every clip must be inside a split folder "
                              "(train/, valid/, test/, ...)")
        splits.setdefault(clip_id.split("/", 1)[0], []).append(clip_id)
    return splits


def _collect(clips: List[Clip], skip_invalid: bool) -> Tuple[Dict[str, ManifestEntry], Dict[str, str], List[str]]:
    """(entries by id, transcripts by id, problems) for every clip, decoding each one."""
    need_transcripts = any(clip.transcript_path for clip in clips)
    entries, transcripts, problems = {}, {}, []
    for clip in tqdm(clips, desc="counting frames", unit="clip"):
        try:
            if need_transcripts:
                if clip.transcript_path is None:
                    raise InvalidClip(f"{clip.video_path or clip.audio_path}: no transcript "
                                      f"({clip.id}{TRANSCRIPT_EXTENSION}) while other clips have one")
                transcripts[clip.id] = read_transcript(clip.transcript_path)
            entries[clip.id] = count_clip(clip)
        except InvalidClip as e:
            if not skip_invalid:
                raise
            problems.append(str(e))
            transcripts.pop(clip.id, None)
    return entries, transcripts, problems


def make_manifests(source: str, out_dir: str, fractions: Sequence[float] = (0.9, 0.05, 0.05), seed: int = 0,
                   split_by_dir: bool = False, skip_invalid: bool = False) -> Tuple[Dict[str, int], List[str]]:
    """Write ``{split}.tsv`` (+ ``.wrd``) for the clips under ``source`` into ``out_dir``.

    Returns ({split: number of clips}, problems skipped). Without ``skip_invalid`` the first
    unreadable / ambiguous / unlabelled clip raises ``InvalidClip``.
    """
    root = os.path.abspath(source)
    if not os.path.isdir(root):
        raise InvalidClip(f"{source}: not a folder")
    clips, problems = find_clips(root)
    if problems and not skip_invalid:
        raise InvalidClip(problems[0])
    entries, transcripts, clip_problems = _collect(clips, skip_invalid)
    problems += clip_problems
    if not entries:
        raise InvalidClip(f"{source}: no usable clips ({', '.join(VIDEO_EXTENSIONS + (AUDIO_EXTENSION,))})")
    ids = sorted(entries)
    splits = split_by_directory(ids) if split_by_dir else split_by_fraction(ids, fractions, seed)
    sizes = {}
    for split, split_ids in splits.items():
        if not split_ids and not split_by_dir and fractions[SPLITS.index(split)] == 0:
            continue
        write_manifest(os.path.join(out_dir, f"{split}.tsv"), root, [entries[i] for i in split_ids])
        if transcripts:
            write_labels(os.path.join(out_dir, f"{split}.wrd"), [transcripts[i] for i in split_ids])
        sizes[split] = len(split_ids)
    if problems:
        logger.warning("skipped %d invalid file(s):\n  %s", len(problems), "\n  ".join(problems))
    return sizes, problems


def parse_fractions(text: str) -> Tuple[float, float, float]:
    """``"0.9,0.05,0.05"`` -> train/valid/test fractions (>= 0, summing to 1)."""
    try:
        fractions = tuple(float(v) for v in text.split(","))
    except ValueError:
        fractions = ()
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise argparse.ArgumentTypeError(f"--fractions wants TRAIN,VALID,TEST >= 0 summing to 1, got {text!r}")
    return fractions


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="folder of clips, searched recursively")
    parser.add_argument("--out", required=True, help="folder for {split}.tsv / {split}.wrd")
    parser.add_argument("--fractions", type=parse_fractions, default=(0.9, 0.05, 0.05),
                        help="train,valid,test fractions of a seeded random split (default 0.9,0.05,0.05)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random split")
    parser.add_argument("--split-by-dir", action="store_true",
                        help="one split per top-level folder of SOURCE (e.g. train/ valid/ test/)")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="skip unreadable or unlabelled clips (counted and reported) instead of failing")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        sizes, problems = make_manifests(args.source, args.out, args.fractions, args.seed,
                                         args.split_by_dir, args.skip_invalid)
    except InvalidClip as e:
        raise SystemExit(f"error: {e}. Fix or remove it, or pass --skip-invalid to skip such clips") from e
    summary = ", ".join(f"{split} {n}" for split, n in sizes.items())
    print(f"wrote manifests to {args.out}: {summary} clips" + (f"; skipped {len(problems)}" if problems else ""))


if __name__ == "__main__":
    main()
