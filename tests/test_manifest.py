"""AV-HuBERT manifests: round trips through real files, every error message, validation."""
import logging

import numpy as np
import pytest

from avplugins.data import media
from avplugins.data.manifest import (
    ManifestEntry, ManifestError, read_labels, read_manifest, select_labels, validate_manifest, write_labels,
    write_manifest,
)

HEADER_ROW = "clip\tclip.mp4\tclip.wav\t10\t6400\n"


def _write_text(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return str(path)


def test_write_read_round_trip_relative_absolute_and_absent_paths(tmp_path):
    root = tmp_path / "media"
    outside = str(tmp_path / "elsewhere" / "b.mp4")
    rows = [
        ManifestEntry("spk1/a", str(root / "spk1" / "a.mp4"), str(root / "spk1" / "a.wav"), 12, 7680),
        ("b", outside, None, 3, 0),
        ("c", None, "c.wav", 0, 16000),  # relative input paths are relative to the root
    ]
    tsv = str(tmp_path / "train.tsv")
    write_manifest(tsv, str(root), rows)

    lines = open(tsv, encoding="utf-8").read().split("\n")
    assert lines[0] == str(root)
    assert lines[1] == "spk1/a\tspk1/a.mp4\tspk1/a.wav\t12\t7680"
    assert lines[2] == f"b\t{outside}\tNone\t3\t0"
    assert lines[3] == "c\tNone\tc.wav\t0\t16000"

    read_root, entries = read_manifest(tsv)
    assert read_root == str(root)
    assert entries == [
        ManifestEntry("spk1/a", str(root / "spk1" / "a.mp4"), str(root / "spk1" / "a.wav"), 12, 7680, 2),
        ManifestEntry("b", outside, None, 3, 0, 3),
        ManifestEntry("c", None, str(root / "c.wav"), 0, 16000, 4),
    ]


def test_relative_root_is_relative_to_the_manifest_folder_and_empty_path_is_absent(tmp_path):
    (tmp_path / "data").mkdir()
    tsv = _write_text(tmp_path / "data" / "valid.tsv", "../media\nx\t\tx.wav\t0\t5\n")
    root, entries = read_manifest(tsv)
    assert root == str(tmp_path / "media")
    assert entries[0].video_path is None and entries[0].audio_path == str(tmp_path / "media" / "x.wav")


def test_labels_round_trip_and_alignment_with_rows(tmp_path):
    labels = ["hello world", "it's café time", ""]
    wrd = str(tmp_path / "train.wrd")
    write_labels(wrd, labels)
    assert read_labels(wrd, num_entries=3) == labels
    entries = [ManifestEntry("a", "a.mp4", None, 1, 0, 2), ManifestEntry("c", "c.mp4", None, 1, 0, 4)]
    assert select_labels(entries, labels) == ["hello world", ""]


@pytest.mark.parametrize("content, match", [
    ("", r"train\.tsv:1: empty file\. The first line must be the root"),
    ("clip\tclip.mp4\tclip.wav\t10\t6400\n", r"train\.tsv:1: missing root line: the first line looks like a clip row"),
    ("\n" + HEADER_ROW, r"train\.tsv:1: missing root line: the first line is empty"),
    ("/root\nclip\tclip.mp4\t10\t6400\n", r"train\.tsv:2: expected 5 tab-separated columns, found 4\. Write id"),
    ("/root\nclip clip.mp4 clip.wav 10 6400\n", r"train\.tsv:2: expected 5 tab-separated columns, found 1"),
    ("/root\n" + HEADER_ROW + "b\tb.mp4\tb.wav\tten\t6400\n",
     r"train\.tsv:3: num_video_frames must be an integer, found 'ten'\. Recount"),
    ("/root\nclip\tclip.mp4\tclip.wav\t10\t-5\n", r"train\.tsv:2: num_audio_samples must be >= 0, found -5"),
    ("/root\nclip\tclip.mp4\tclip.wav\t1.5\t5\n", r"train\.tsv:2: num_video_frames must be an integer, found '1\.5'"),
    ("/root\n" + HEADER_ROW + HEADER_ROW,
     r"train\.tsv:3: duplicate id 'clip' \(first on line 2\)\. Give every clip a unique id"),
    ("/root\nclip\t../secret.mp4\tclip.wav\t10\t6400\n",
     r"train\.tsv:2: path '\.\./secret\.mp4' is outside the manifest root /root\. Use paths inside the root"),
    ("/root\nclip\ta/../../b.wav\tNone\t10\t0\n",
     r"train\.tsv:2: path 'a/\.\./\.\./b\.wav' is outside the manifest root"),
    ("/root\nclip\tNone\t\t10\t0\n", r"train\.tsv:2: both media paths are empty\. Give a video path"),
    ("/root\n" + HEADER_ROW + "\n" + HEADER_ROW.replace("clip", "d"), r"train\.tsv:3: blank line\. Remove"),
])
def test_read_manifest_errors_name_file_line_problem_and_fix(tmp_path, content, match):
    tsv = _write_text(tmp_path / "train.tsv", content)
    with pytest.raises(ManifestError, match=match):
        read_manifest(tsv)


def test_non_utf8_bytes_name_the_line(tmp_path):
    tsv = tmp_path / "train.tsv"
    tsv.write_bytes(b"/root\n" + HEADER_ROW.encode() + b"caf\xe9\tx.mp4\tNone\t1\t0\n")
    with pytest.raises(ManifestError, match=r"train\.tsv:3: not valid UTF-8 \(byte 0xe9 at column 4\)\. Re-save"):
        read_manifest(str(tsv))
    wrd = tmp_path / "train.wrd"
    wrd.write_bytes(b"fine\n\xff\xfe bad\n")
    with pytest.raises(ManifestError, match=r"train\.wrd:2: not valid UTF-8"):
        read_labels(str(wrd))


def test_labels_count_mismatch_names_both_files_and_counts(tmp_path):
    wrd = _write_text(tmp_path / "valid.wrd", "one\ntwo\n")
    with pytest.raises(ManifestError, match=r"valid\.wrd:3: 2 transcript lines but .*valid\.tsv has 3 rows\. Write"):
        read_labels(wrd, num_entries=3)


def test_write_rejects_duplicates_negative_counts_and_line_breaks(tmp_path):
    tsv = str(tmp_path / "t.tsv")
    with pytest.raises(ValueError, match="clip id 'a' appears twice"):
        write_manifest(tsv, "/r", [("a", "a.mp4", None, 1, 0), ("a", "b.mp4", None, 1, 0)])
    with pytest.raises(ValueError, match="num_audio_samples of clip 'a' must be an integer >= 0, got -1"):
        write_manifest(tsv, "/r", [("a", "a.mp4", "a.wav", 1, -1)])
    with pytest.raises(ValueError, match=r"id 'a\\tb' of clip .* contains a tab"):
        write_manifest(tsv, "/r", [("a\tb", "a.mp4", None, 1, 0)])
    with pytest.raises(ValueError, match="transcript 1 .* contains a line break"):
        write_labels(str(tmp_path / "t.wrd"), ["ok", "two\nlines"])


def test_validate_missing_file_raises_then_skips_with_report_and_warning(tmp_path, caplog):
    root = tmp_path / "media"
    _touch(root / "a.mp4"), _touch(root / "a.wav"), _touch(root / "c.mp4")
    tsv = _write_text(tmp_path / "train.tsv", (
        f"{root}\n"
        "a\ta.mp4\ta.wav\t10\t6400\n"
        "b\tb.mp4\tNone\t10\t0\n"        # missing file
        "c\tc.mp4\tNone\tx\t0\n"         # bad count
        "c\tc.mp4\tNone\t10\t0\n"
        "e\t../e.mp4\tNone\t10\t0\n"     # outside the root
    ))
    with pytest.raises(ManifestError, match=r"train\.tsv:3: video file .*b\.mp4 does not exist \(2 more problems"):
        validate_manifest(tsv)

    with caplog.at_level(logging.WARNING):
        entries, report = validate_manifest(tsv, skip_invalid=True)
    assert [e.id for e in entries] == ["a", "c"]
    assert [e.line_number for e in entries] == [2, 5]
    assert report.num_ok == 2 and report.num_skipped == 3
    assert [(line, entry_id) for line, entry_id, _ in report.problems] == [(3, "b"), (4, "c"), (6, "e")]
    assert "outside the manifest root" in report.problems[2][2]
    assert "2 rows ok, 3 skipped" in caplog.text and "line 3 (b)" in caplog.text

    entries, report = validate_manifest(tsv, check_files=False, skip_invalid=True)
    assert [e.id for e in entries] == ["a", "b", "c"] and report.num_skipped == 2


def test_validate_check_counts_against_decoded_media(tmp_path):
    root = tmp_path / "media"
    root.mkdir()
    frames = np.random.default_rng(0).integers(0, 255, (10, 32, 32, 3), dtype=np.uint8)
    media.write_video(str(root / "a.mp4"), frames, fps=25)
    media.write_audio(str(root / "a.wav"), np.zeros(6400, np.float32))
    (root / "broken.mp4").write_bytes(b"not a video at all" * 10)
    tsv = _write_text(tmp_path / "train.tsv", (
        f"{root}\n"
        "exact\ta.mp4\ta.wav\t10\t6400\n"
        "within_tolerance\ta.mp4\ta.wav\t11\t5760\n"   # 1 frame, 640 samples off
        "frames_off\ta.mp4\ta.wav\t12\t6400\n"
        "samples_off\ta.mp4\ta.wav\t10\t7041\n"
        "broken\tbroken.mp4\tNone\t10\t0\n"
    ))
    entries, report = validate_manifest(tsv, check_counts=True, skip_invalid=True)
    assert [e.id for e in entries] == ["exact", "within_tolerance"]
    messages = {entry_id: message for _, entry_id, message in report.problems}
    assert messages["frames_off"] == "num_video_frames is 12 but the video has 10 frames at 25 fps"
    assert messages["samples_off"] == "num_audio_samples is 7041 but the audio has 6400 samples at 16000 Hz"
    assert messages["broken"].startswith("cannot decode:") and "broken.mp4" in messages["broken"]
    with pytest.raises(ManifestError, match=r"train\.tsv:4: num_video_frames is 12 .*Recount with"):
        validate_manifest(tsv, check_counts=True)
