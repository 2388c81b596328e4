"""AV-HuBERT manifests: ``{split}.tsv`` clip lists and ``{split}.wrd`` transcripts.

``{split}.tsv``::

    /path/to/root
    id <TAB> video_path <TAB> audio_path <TAB> num_video_frames <TAB> num_audio_samples
    ...

- Line 1 is the root directory. A relative root is taken relative to the manifest's own
  folder (so a corpus folder whose manifests say ``.`` can be moved as a whole).
- Every later line is one clip row (a blank line is an invalid row, not a separator), so
  the transcript of the row on line ``n`` is line ``n - 1`` of ``{split}.wrd``.
- Media paths are relative to the root or absolute; a relative path may not leave the
  root through ``..``. A single-modality corpus writes ``None`` for the absent stream's
  path and 0 for its count (an empty field is read as absent too).
- ``num_video_frames`` counts frames at 25 fps, ``num_audio_samples`` samples at 16 kHz.

Every problem is reported as ``<file>:<line>: <problem>. <what to do>``.
"""
import logging
import os
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence, Tuple, Union

from avplugins.data.media import MediaError, count_audio_samples, count_video_frames

logger = logging.getLogger(__name__)

COLUMNS = ("id", "video_path", "audio_path", "num_video_frames", "num_audio_samples")
ABSENT_PATH = "None"
VIDEO_FPS = 25.0
AUDIO_SAMPLE_RATE = 16000
# check_counts tolerance: decoders may disagree by one frame at a clip's end.
VIDEO_FRAME_TOLERANCE = 1
AUDIO_SAMPLE_TOLERANCE = int(AUDIO_SAMPLE_RATE / VIDEO_FPS)


class ManifestError(ValueError):
    """A manifest or label file that cannot be used; the message names file, line and fix."""


@dataclass(frozen=True)
class ManifestEntry:
    """One clip. Paths are absolute (resolved against the root); None = modality absent.

    ``num_video_frames`` is in frames at 25 fps, ``num_audio_samples`` in samples at 16 kHz;
    ``line_number`` is the 1-based line of the row in its ``.tsv`` (0 if not read from one).
    """

    id: str
    video_path: Optional[str]
    audio_path: Optional[str]
    num_video_frames: int
    num_audio_samples: int
    line_number: int = 0


Problem = Tuple[int, str, str]  # (line_number, entry_id, message)


@dataclass
class ValidationReport:
    """What ``validate_manifest`` found: rows kept and ``(line, id, message)`` per bad row."""

    num_ok: int = 0
    problems: List[Problem] = field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        """Rows dropped: each bad row has exactly one (possibly combined) problem."""
        return len(self.problems)

    def summary(self, tsv_path: str, max_examples: int = 5) -> str:
        """One paragraph: counts and the first ``max_examples`` problems."""
        lines = [f"{tsv_path}: {self.num_ok} rows ok, {self.num_skipped} skipped"]
        lines += [f"  line {ln} ({eid or '-'}): {msg}" for ln, eid, msg in self.problems[:max_examples]]
        if self.num_skipped > max_examples:
            lines.append(f"  ... and {self.num_skipped - max_examples} more")
        return "\n".join(lines)


def _error(path: str, line_number: int, problem: str, fix: str) -> ManifestError:
    return ManifestError(f"{path}:{line_number}: {problem}. {fix}")


def _read_text_lines(path: str) -> List[str]:
    """Lines of a UTF-8 file without their line ends; names the first non-UTF-8 line."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ManifestError(f"{path}:0: cannot read the file ({e.strerror}). Check the path") from e
    raw_lines = data.split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()  # the final line end does not start another line
    lines = []
    for line_number, raw in enumerate(raw_lines, start=1):
        try:
            lines.append(raw.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as e:
            raise _error(
                path, line_number, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})",
                "Re-save the file as UTF-8",
            ) from e
    return lines


def _resolve_root(tsv_path: str, root: str) -> str:
    """Absolute root; a relative root is relative to the manifest's folder."""
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(tsv_path)), root))


def _is_inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def _parse_path(field_value: str, root: str) -> Tuple[Optional[str], Optional[str]]:
    """(absolute path or None, problem or None) for one path column."""
    if field_value in ("", ABSENT_PATH):
        return None, None
    if os.path.isabs(field_value):
        return os.path.normpath(field_value), None
    resolved = os.path.normpath(os.path.join(root, field_value))
    if not _is_inside(resolved, root):
        return None, f"path {field_value!r} is outside the manifest root {root}"
    return resolved, None


def _parse_count(field_value: str, column: str) -> Tuple[int, Optional[str]]:
    try:
        value = int(field_value)
    except ValueError:
        return 0, f"{column} must be an integer, found {field_value!r}"
    if value < 0:
        return 0, f"{column} must be >= 0, found {value}"
    return value, None


_ROW_FIX = {
    "columns": "Write id, video_path, audio_path, num_video_frames, num_audio_samples separated by tabs",
    "count": "Recount with `python -m preprocess.count_frames MANIFEST --in-place`",
    "path": "Use paths inside the root (first line) or absolute paths",
    "duplicate": "Give every clip a unique id",
    "blank": "Remove the blank line (and its line in the .wrd file)",
    "no_media": "Give a video path, an audio path or both",
    "missing": "Fix the path or remove the row (and its transcript); --skip-invalid skips such rows",
    "decode": "Check the file plays; --skip-invalid skips such rows",
}


def _parse_row(line: str, root: str) -> Tuple[Optional[ManifestEntry], Optional[Tuple[str, str, str]]]:
    """(entry, None) or (None, (entry_id, problem, fix)) for one row; line_number filled later."""
    if not line.strip():
        return None, ("", "blank line", _ROW_FIX["blank"])
    fields = line.split("\t")
    if len(fields) != len(COLUMNS):
        return None, ("", f"expected {len(COLUMNS)} tab-separated columns, found {len(fields)}", _ROW_FIX["columns"])
    entry_id = fields[0]
    if not entry_id:
        return None, ("", "empty id", _ROW_FIX["duplicate"])
    video_path, video_problem = _parse_path(fields[1], root)
    audio_path, audio_problem = _parse_path(fields[2], root)
    if video_problem or audio_problem:
        return None, (entry_id, video_problem or audio_problem, _ROW_FIX["path"])
    if video_path is None and audio_path is None:
        return None, (entry_id, "both media paths are empty", _ROW_FIX["no_media"])
    num_video_frames, frames_problem = _parse_count(fields[3], COLUMNS[3])
    num_audio_samples, samples_problem = _parse_count(fields[4], COLUMNS[4])
    if frames_problem or samples_problem:
        return None, (entry_id, frames_problem or samples_problem, _ROW_FIX["count"])
    return ManifestEntry(entry_id, video_path, audio_path, num_video_frames, num_audio_samples), None


def _parse_manifest(tsv_path: str) -> Tuple[str, List[ManifestEntry], List[Tuple[int, str, str, str]]]:
    """(absolute root, good entries, [(line, id, problem, fix)]); file-level errors raise."""
    lines = _read_text_lines(tsv_path)
    if not lines:
        raise _error(tsv_path, 1, "empty file", "The first line must be the root directory, then one row per clip")
    root_line = lines[0].strip()
    if not root_line or "\t" in root_line:
        what = "is empty" if not root_line else "looks like a clip row (it has tabs)"
        raise _error(tsv_path, 1, f"missing root line: the first line {what}",
                     "Put the root directory of the media paths on the first line")
    root = _resolve_root(tsv_path, root_line)
    entries, problems, first_line_of_id = [], [], {}
    for line_number, line in enumerate(lines[1:], start=2):
        entry, problem = _parse_row(line, root)
        if entry is not None and entry.id in first_line_of_id:
            problem = (entry.id, f"duplicate id {entry.id!r} (first on line {first_line_of_id[entry.id]})",
                       _ROW_FIX["duplicate"])
        if problem is not None:
            problems.append((line_number,) + problem)
            continue
        first_line_of_id[entry.id] = line_number
        entries.append(_with_line(entry, line_number))
    return root, entries, problems


def _with_line(entry: ManifestEntry, line_number: int) -> ManifestEntry:
    return ManifestEntry(entry.id, entry.video_path, entry.audio_path,
                         entry.num_video_frames, entry.num_audio_samples, line_number)


def read_manifest(tsv_path: str) -> Tuple[str, List[ManifestEntry]]:
    """(absolute root, entries in file order) of a ``.tsv``; the first bad row raises
    ``ManifestError``. Checks the format only (see ``validate_manifest`` for files)."""
    root, entries, problems = _parse_manifest(tsv_path)
    if problems:
        line_number, _, problem, fix = problems[0]
        raise _error(tsv_path, line_number, problem, fix)
    return root, entries


def count_rows(tsv_path: str) -> int:
    """Clip rows of a ``.tsv``: every line after the root line, valid or not (what its
    ``.wrd`` must have one transcript line for)."""
    return max(0, len(_read_text_lines(tsv_path)) - 1)


RowLike = Union[ManifestEntry, Sequence]


def _as_entry(row: RowLike) -> ManifestEntry:
    if isinstance(row, ManifestEntry):
        return row
    entry_id, video_path, audio_path, num_video_frames, num_audio_samples = row
    return ManifestEntry(entry_id, video_path, audio_path, num_video_frames, num_audio_samples)


def _format_path(path: Optional[str], root: str) -> str:
    """Path as written: relative when inside the root, absolute otherwise, ``None`` if absent."""
    if path is None:
        return ABSENT_PATH
    resolved = os.path.normpath(os.path.join(root, path))
    return os.path.relpath(resolved, root) if _is_inside(resolved, root) else resolved


def _format_row(entry: ManifestEntry, root: str) -> str:
    text_fields = ((entry.id, "id"), (entry.video_path or "", "video_path"), (entry.audio_path or "", "audio_path"))
    for text, column in text_fields:
        if any(c in text for c in "\t\n\r"):
            raise ValueError(f"{column} {text!r} of clip {entry.id!r} contains a tab or line break; rename it")
    for count, column in ((entry.num_video_frames, COLUMNS[3]), (entry.num_audio_samples, COLUMNS[4])):
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError(f"{column} of clip {entry.id!r} must be an integer >= 0, got {count!r}")
    if entry.video_path is None and entry.audio_path is None:
        raise ValueError(f"clip {entry.id!r} has neither a video nor an audio path")
    return "\t".join([entry.id, _format_path(entry.video_path, root), _format_path(entry.audio_path, root),
                      str(entry.num_video_frames), str(entry.num_audio_samples)])


def write_manifest(tsv_path: str, root: str, rows: Iterable[RowLike]) -> None:
    """Write a ``.tsv``: ``root`` as given on line 1, then one row per clip.

    ``rows`` are ``ManifestEntry`` or ``(id, video_path, audio_path, num_video_frames,
    num_audio_samples)`` tuples; a path may be None (absent), absolute, or relative to the
    root. Paths inside the root are written relative to it. Raises ``ValueError`` for an id
    used twice, negative/non-integer counts, or tabs/line breaks in a field.
    """
    if not root or any(c in root for c in "\t\n\r"):
        raise ValueError(f"root {root!r} must be a non-empty path without tabs or line breaks")
    absolute_root = _resolve_root(tsv_path, root)
    lines, seen_ids = [root], set()
    for entry in map(_as_entry, rows):
        if entry.id in seen_ids:
            raise ValueError(f"{tsv_path}: clip id {entry.id!r} appears twice; ids must be unique")
        seen_ids.add(entry.id)
        lines.append(_format_row(entry, absolute_root))
    _write_lines(tsv_path, lines)


def _write_lines(path: str, lines: List[str]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(line + "\n" for line in lines)


def _sibling_manifest(wrd_path: str) -> str:
    return os.path.splitext(wrd_path)[0] + ".tsv"


def read_labels(wrd_path: str, num_entries: Optional[int] = None, manifest_path: Optional[str] = None) -> List[str]:
    """Transcripts of a ``.wrd``, one per line. With ``num_entries`` (rows of the manifest
    ``manifest_path``, default the sibling ``.tsv``) a different line count raises."""
    labels = _read_text_lines(wrd_path)
    if num_entries is not None and len(labels) != num_entries:
        manifest_path = manifest_path or _sibling_manifest(wrd_path)
        raise _error(
            wrd_path, len(labels) + 1,
            f"{len(labels)} transcript lines but {manifest_path} has {num_entries} rows",
            "Write exactly one transcript line per manifest row, in the same order (rows cannot be "
            "skipped: which transcript belongs to which row is unknown)",
        )
    return labels


def write_labels(wrd_path: str, labels: Iterable[str]) -> None:
    """Write one transcript per line (UTF-8); a label with a line break raises ``ValueError``."""
    labels = list(labels)
    for index, label in enumerate(labels):
        if any(c in label for c in "\n\r"):
            raise ValueError(f"{wrd_path}: transcript {index} ({label!r}) contains a line break; remove it")
    _write_lines(wrd_path, labels)


def select_labels(entries: Sequence[ManifestEntry], labels: Sequence[str]) -> List[str]:
    """Transcripts of ``entries`` (e.g. those ``validate_manifest`` kept) from all of a
    ``.wrd``'s ``labels``: the row on tsv line ``n`` owns label ``n - 2``."""
    return [labels[entry.line_number - 2] for entry in entries]


def count_media(video_path: Optional[str], audio_path: Optional[str]) -> Tuple[int, int]:
    """(video frames at 25 fps, audio samples at 16 kHz) by decoding; 0 for an absent path.
    Raises ``MediaError`` for a file that cannot be decoded."""
    num_video_frames = count_video_frames(video_path, fps=VIDEO_FPS) if video_path else 0
    num_audio_samples = count_audio_samples(audio_path, sample_rate=AUDIO_SAMPLE_RATE) if audio_path else 0
    return num_video_frames, num_audio_samples


def _entry_problem(entry: ManifestEntry, check_files: bool, check_counts: bool) -> Optional[Tuple[str, str]]:
    """(problem, fix) for one parsed entry's media files, or None when they pass."""
    paths = [(entry.video_path, "video"), (entry.audio_path, "audio")]
    missing = [f"{kind} file {path} does not exist" for path, kind in paths if path and not os.path.isfile(path)]
    if missing and (check_files or check_counts):
        return "; ".join(missing), _ROW_FIX["missing"]
    if not check_counts:
        return None
    try:
        num_video_frames, num_audio_samples = count_media(entry.video_path, entry.audio_path)
    except MediaError as e:
        return f"cannot decode: {e}", _ROW_FIX["decode"]
    mismatches = []
    if abs(num_video_frames - entry.num_video_frames) > VIDEO_FRAME_TOLERANCE:
        mismatches.append(f"num_video_frames is {entry.num_video_frames} but the video has {num_video_frames} "
                          f"frames at {VIDEO_FPS:g} fps")
    if abs(num_audio_samples - entry.num_audio_samples) > AUDIO_SAMPLE_TOLERANCE:
        mismatches.append(f"num_audio_samples is {entry.num_audio_samples} but the audio has {num_audio_samples} "
                          f"samples at {AUDIO_SAMPLE_RATE} Hz")
    return ("; ".join(mismatches), _ROW_FIX["count"]) if mismatches else None


def validate_manifest(
    tsv_path: str, check_files: bool = True, check_counts: bool = False, skip_invalid: bool = False,
    skip_hint: Optional[str] = None,
) -> Tuple[List[ManifestEntry], ValidationReport]:
    """Check a ``.tsv`` row by row: format, and optionally that media files exist
    (``check_files``) and that counts match decoding (``check_counts``: within 1 frame at
    25 fps / 640 samples at 16 kHz).

    Returns (entries that passed, report). Without ``skip_invalid`` the first problem raises
    ``ManifestError`` (its message tells how many more there are, and ends with ``skip_hint``,
    e.g. the option that skips rows); with it bad rows are dropped, listed in the report and
    summarised with ``logging.warning``. File-level problems (empty file, no root line,
    non-UTF-8 bytes) always raise.
    """
    _, parsed, problems = _parse_manifest(tsv_path)
    entries_ok = []
    for entry in parsed:
        problem = _entry_problem(entry, check_files, check_counts)
        if problem is None:
            entries_ok.append(entry)
        else:
            problems.append((entry.line_number, entry.id) + problem)
    problems.sort(key=lambda p: p[0])
    if problems and not skip_invalid:
        line_number, _, problem, fix = problems[0]
        more = f" ({len(problems) - 1} more problems in this file)" if len(problems) > 1 else ""
        raise _error(tsv_path, line_number, problem + more, fix if skip_hint is None else f"{fix}; {skip_hint}")
    report = ValidationReport(num_ok=len(entries_ok), problems=[(ln, eid, msg) for ln, eid, msg, _ in problems])
    if problems:
        logger.warning("skipping invalid manifest rows\n%s", report.summary(tsv_path))
    return entries_ok, report
