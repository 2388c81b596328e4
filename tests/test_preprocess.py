"""Corpus-preparation CLIs run on tiny real media files: manifests, recounts, vocabulary,
mouth crops (with a known-answer geometry test)."""
import collections
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm

from avplugins.data import media
from avplugins.data.manifest import read_labels, read_manifest, write_labels, write_manifest
from preprocess import build_vocab, count_frames, make_manifest, mouth_crop

RNG = np.random.default_rng(0)


def _write_clip(path, num_frames, num_audio_samples=None, fps=25, size=32):
    """A tiny random mp4 (with a noise track of ``num_audio_samples`` at 16 kHz if given)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    frames = RNG.integers(0, 255, (num_frames, size, size, 3), dtype=np.uint8)
    audio = None if num_audio_samples is None else (0.1 * RNG.standard_normal(num_audio_samples)).astype(np.float32)
    media.write_video(str(path), frames, fps=fps, audio=audio)
    return str(path)


def _write_wav(path, num_samples):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    media.write_audio(str(path), (0.1 * RNG.standard_normal(num_samples)).astype(np.float32))


def _read_all_splits(out_dir, splits=("train", "valid", "test")):
    """{id: (entry, label)} over the splits' manifests, and {split: ids}."""
    clips, ids_by_split = {}, {}
    for split in splits:
        _, entries = read_manifest(os.path.join(out_dir, f"{split}.tsv"))
        labels = read_labels(os.path.join(out_dir, f"{split}.wrd"), len(entries))
        ids_by_split[split] = [e.id for e in entries]
        clips.update({e.id: (e, label) for e, label in zip(entries, labels)})
    return clips, ids_by_split


def test_every_cli_has_help():
    code = ("import runpy, sys\n"
            "for name in ['make_manifest', 'count_frames', 'build_vocab', 'mouth_crop']:\n"
            "    sys.argv = [name, '--help']\n"
            "    try:\n"
            "        runpy.run_module('preprocess.' + name, run_name='__main__')\n"
            "    except SystemExit as e:\n"
            "        assert e.code == 0, (name, e.code)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("usage:") == 4
    for flag in ("--split-by-dir", "--in-place", "--vocab-size", "--fixed-box"):
        assert flag in result.stdout


# ----------------------------------------------------------------------------- make_manifest


@pytest.mark.parametrize("text, expected", [
    ("HELLO, WORLD!", "hello world"),
    ("It\u2019s a well-known fact.", "it's a well known fact"),
    ("  Don't   \"STOP\" (now)...  ", "don't stop now"),
    ("café — naïve; ok?", "café naïve ok"),
])
def test_normalize_transcript(text, expected):
    assert make_manifest.normalize_transcript(text) == expected


@pytest.fixture
def corpus(tmp_path):
    """Five clips covering every pairing rule; returns (folder, {id: (frames, samples, audio file, text)})."""
    src = tmp_path / "corpus"
    _write_clip(src / "spk1" / "c1.mp4", 5, 3200)
    (src / "spk1" / "c1.txt").write_text(
        "Text:  HELLO, WORLD!\nConf:  4\n\nWORD START END ASDSCORE\nHELLO 0.1 0.3 2.1\n")
    _write_clip(src / "spk1" / "c2.mp4", 7)
    _write_wav(src / "spk1" / "c2.wav", 4000)
    (src / "spk1" / "c2.txt").write_text("It\u2019s a well-known\nfact.\n")
    _write_clip(src / "spk2" / "c3.mkv", 4, 1600)
    (src / "spk2" / "c3.txt").write_text("Don't STOP")
    _write_wav(src / "spk2" / "c4.wav", 2400)
    (src / "spk2" / "c4.txt").write_text("Text:  AUDIO ONLY\n")
    _write_clip(src / "c5.mp4", 6)
    (src / "c5.txt").write_text("silent film")
    expected = {
        "spk1/c1": (5, 3200, src / "spk1" / "c1.mp4", "hello world"),
        "spk1/c2": (7, 4000, src / "spk1" / "c2.wav", "it's a well known fact"),
        "spk2/c3": (4, 1600, src / "spk2" / "c3.mkv", "don't stop"),
        "spk2/c4": (0, 2400, src / "spk2" / "c4.wav", "audio only"),
        "c5": (6, 0, None, "silent film"),
    }
    return src, expected


def test_make_manifest_counts_pairs_labels_and_seeded_split(corpus, tmp_path, capsys):
    src, expected = corpus
    out = tmp_path / "manifests"
    make_manifest.main([str(src), "--out", str(out), "--fractions", "0.6,0.2,0.2", "--seed", "3"])
    assert "train 3, valid 1, test 1" in capsys.readouterr().out

    clips, ids_by_split = _read_all_splits(str(out))
    assert sorted(clips) == sorted(expected)
    assert sum(len(ids) for ids in ids_by_split.values()) == len(expected)  # disjoint splits
    for clip_id, (frames, samples, audio, text) in expected.items():
        entry, label = clips[clip_id]
        assert (entry.num_video_frames, entry.num_audio_samples, label) == (frames, samples, text), clip_id
        assert entry.audio_path == (None if audio is None else str(audio))
        assert (entry.video_path is None) == (frames == 0)
    assert read_manifest(str(out / "train.tsv"))[0] == str(src)
    assert open(out / "train.tsv").read().split("\n")[1].split("\t")[0] in expected  # relative ids/paths

    again = tmp_path / "again"
    make_manifest.main([str(src), "--out", str(again), "--fractions", "0.6,0.2,0.2", "--seed", "3"])
    for split in ("train", "valid", "test"):
        assert (again / f"{split}.tsv").read_text() == (out / f"{split}.tsv").read_text()


def test_split_by_fraction_sizes_disjoint_and_seeded():
    ids = [f"id{i:03d}" for i in range(100)]
    splits = make_manifest.split_by_fraction(ids, (0.8, 0.1, 0.1), seed=7)
    assert {k: len(v) for k, v in splits.items()} == {"train": 80, "valid": 10, "test": 10}
    assert sorted(sum(splits.values(), [])) == ids
    assert splits == make_manifest.split_by_fraction(ids, (0.8, 0.1, 0.1), seed=7)
    assert splits != make_manifest.split_by_fraction(ids, (0.8, 0.1, 0.1), seed=8)
    small = make_manifest.split_by_fraction(ids[:3], (0.9, 0.05, 0.05), seed=0)
    assert {k: len(v) for k, v in small.items()} == {"train": 1, "valid": 1, "test": 1}


def test_make_manifest_split_by_dir_without_transcripts(tmp_path):
    src = tmp_path / "corpus"
    for split, num_clips in (("train", 2), ("valid", 1), ("test", 1)):
        for i in range(num_clips):
            _write_clip(src / split / f"s{i}" / "clip.mp4", 3 + i, 1280)
    out = tmp_path / "out"
    make_manifest.main([str(src), "--out", str(out), "--split-by-dir"])
    _, train = read_manifest(str(out / "train.tsv"))
    assert [(e.id, e.num_video_frames, e.num_audio_samples) for e in train] == [
        ("train/s0/clip", 3, 1280), ("train/s1/clip", 4, 1280)]
    assert [e.id for e in read_manifest(str(out / "test.tsv"))[1]] == ["test/s0/clip"]
    assert not (out / "train.wrd").exists()


def test_make_manifest_unreadable_file_fails_or_is_skipped(corpus, tmp_path, capsys, caplog):
    src, expected = corpus
    (src / "spk2" / "broken.mp4").write_bytes(b"\x00garbage" * 64)
    (src / "spk2" / "broken.txt").write_text("never read")
    with pytest.raises(SystemExit, match=r"error: .*broken\.mp4: .*--skip-invalid"):
        make_manifest.main([str(src), "--out", str(tmp_path / "out")])

    with caplog.at_level(logging.WARNING):
        make_manifest.main([str(src), "--out", str(tmp_path / "out"), "--skip-invalid"])
    assert "skipped 1" in capsys.readouterr().out
    assert "broken.mp4" in caplog.text
    clips, _ = _read_all_splits(str(tmp_path / "out"))
    assert sorted(clips) == sorted(expected)


def test_make_manifest_missing_transcript_is_an_error(corpus, tmp_path):
    src, _ = corpus
    os.remove(src / "spk2" / "c3.txt")
    with pytest.raises(SystemExit, match=r"c3\.mkv: no transcript \(spk2/c3\.txt\) while other clips have one"):
        make_manifest.main([str(src), "--out", str(tmp_path / "out")])


# ----------------------------------------------------------------------------- count_frames


@pytest.fixture
def miscounted_manifest(tmp_path):
    """A manifest + labels whose counts are wrong, one row pointing at a broken file."""
    root = tmp_path / "media"
    _write_clip(root / "a.mp4", 6, 2560)
    _write_clip(root / "b.mp4", 3)
    (root / "broken.mp4").write_bytes(b"\x00garbage" * 64)
    tsv = str(tmp_path / "data" / "train.tsv")
    write_manifest(tsv, str(root), [("a", "a.mp4", "a.mp4", 99, 1), ("broken", "broken.mp4", None, 1, 0),
                                    ("b", "b.mp4", None, 0, 0)])
    write_labels(tsv.replace(".tsv", ".wrd"), ["label a", "label broken", "label b"])
    return tsv


def test_count_frames_recounts_or_skips_undecodable_rows(miscounted_manifest, tmp_path):
    with pytest.raises(SystemExit, match=r"error: .*broken\.mp4: .*--skip-invalid"):
        count_frames.main([miscounted_manifest, "--in-place"])

    out = str(tmp_path / "fixed" / "train.tsv")
    count_frames.main([miscounted_manifest, "--out", out, "--skip-invalid"])
    _, entries = read_manifest(out)
    assert [(e.id, e.num_video_frames, e.num_audio_samples) for e in entries] == [("a", 6, 2560), ("b", 3, 0)]
    assert read_labels(out.replace(".tsv", ".wrd"), len(entries)) == ["label a", "label b"]


def test_count_frames_in_place_keeps_relative_root(tmp_path):
    root = tmp_path / "data"
    _write_clip(root / "a.mp4", 4, 1600)
    tsv = str(root / "train.tsv")
    write_manifest(tsv, ".", [("a", str(root / "a.mp4"), str(root / "a.mp4"), 0, 0)])
    count_frames.main([tsv, "--in-place"])
    assert open(tsv).read() == ".\na\ta.mp4\ta.mp4\t4\t1600\n"


# ----------------------------------------------------------------------------- build_vocab


WORDS = "the cat sat on a mat while dogs barked at night and birds sang songs of joy".split()


def _write_sentences(path, num_sentences, seed=0):
    rng = np.random.default_rng(seed)
    sentences = [" ".join(rng.choice(WORDS, size=rng.integers(3, 9))) for _ in range(num_sentences)]
    path.write_text("\n".join(sentences) + "\n")
    return sentences


def test_build_vocab_dictionary_loads_in_fairseq_and_covers_every_piece(tmp_path):
    from fairseq.data import Dictionary

    sentences = _write_sentences(tmp_path / "train.wrd", 200)
    model_path, dict_path = build_vocab.build_vocab(str(tmp_path / "train.wrd"), str(tmp_path / "vocab"),
                                                    vocab_size=40)
    assert model_path == str(tmp_path / "vocab" / "spm_unigram40.model")
    assert os.path.isfile(model_path.replace(".model", ".vocab"))
    processor = spm.SentencePieceProcessor(model_file=model_path)
    assert processor.get_piece_size() == 40

    dictionary = Dictionary.load(dict_path)
    assert len(dictionary) == 4 + 40 - 3  # fairseq's 4 specials + pieces without <unk> <s> </s>
    for sentence in ("the cat sat on a mat", "birds sang at night", "dogs barked"):
        pieces = processor.encode(sentence, out_type=str)
        assert all(dictionary.index(p) != dictionary.unk() for p in pieces)
        assert processor.decode(processor.encode(sentence)) == sentence

    expected_counts = collections.Counter(p for s in sentences for p in processor.encode(s, out_type=str))
    lines = [line.split(" ") for line in open(dict_path).read().splitlines()]
    counts = [int(c) for _, c in lines]
    assert counts == sorted(counts, reverse=True)
    assert {piece: int(c) for piece, c in lines if int(c) > 0} == dict(expected_counts)
    assert not {"<unk>", "<s>", "</s>", "<pad>"} & {piece for piece, _ in lines}


def test_build_vocab_small_corpus_gets_a_smaller_vocabulary_and_says_so(tmp_path, caplog, capsys):
    (tmp_path / "train.wrd").write_text("hello world\nthe cat\n")
    with caplog.at_level(logging.WARNING):
        build_vocab.main(["--wrd", str(tmp_path / "train.wrd"), "--out", str(tmp_path / "v")])
    model_path = tmp_path / "v" / "spm_unigram1000.model"
    num_pieces = spm.SentencePieceProcessor(model_file=str(model_path)).get_piece_size()
    assert num_pieces < 1000
    assert f"too small for 1000 pieces: trained a vocabulary of {num_pieces} pieces" in caplog.text
    assert f"({num_pieces} pieces)" in capsys.readouterr().out


def test_build_vocab_empty_transcripts_fail_clearly(tmp_path):
    (tmp_path / "train.wrd").write_text("\n\n")
    with pytest.raises(SystemExit, match=r"train\.wrd: no transcripts"):
        build_vocab.main(["--wrd", str(tmp_path / "train.wrd"), "--out", str(tmp_path / "v")])


# ----------------------------------------------------------------------------- mouth_crop


def _face_landmarks(centre, angle, scale=1.0):
    """(68, 2) iBUG landmarks of a schematic face: eyes 40 px apart at y=-15, mouth centred at
    (0, 30) (an ellipse 28 x 10 px), rotated by ``angle`` and scaled about ``centre``."""
    template = np.zeros((68, 2))
    template[:36] = [0, 0]  # jaw, brows, nose: unused by the crop
    ring = np.linspace(0, 2 * np.pi, 6, endpoint=False)
    template[36:42] = np.c_[-20 + 4 * np.cos(ring), -15 + 2 * np.sin(ring)]
    template[42:48] = np.c_[20 + 4 * np.cos(ring), -15 + 2 * np.sin(ring)]
    lips = np.linspace(0, 2 * np.pi, 20, endpoint=False)
    template[48:68] = np.c_[14 * np.cos(lips), 30 + 5 * np.sin(lips)]
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return np.asarray(centre) + scale * template @ rotation.T


def _face_frame(height, width, centre, angle, scale=1.0, supersample=4):
    """(H, W, 3) uint8: background 20, a bright (230) ellipse with semi-axes 12 x 4 face px
    at the face's mouth, rotated with the face; edges anti-aliased by ``supersample``^2
    sub-pixel samples so that the blob's moments are not biased by the pixel grid."""
    offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
    y, x = np.mgrid[0:height, 0:width].astype(float)
    coverage = np.zeros((height, width))
    for oy in offsets:
        for ox in offsets:
            dx, dy = (x + ox - centre[0]) / scale, (y + oy - centre[1]) / scale
            face_x = np.cos(angle) * dx + np.sin(angle) * dy  # inverse rotation into face coordinates
            face_y = -np.sin(angle) * dx + np.cos(angle) * dy
            coverage += (face_x / 12) ** 2 + ((face_y - 30) / 4) ** 2 <= 1
    image = 20 + 210 * coverage / supersample ** 2
    return np.repeat(np.round(image).astype(np.uint8)[..., None], 3, axis=-1)


def _blob_moments(crop, background=20):
    """(centroid x, centroid y, major-axis angle in degrees, major std, minor std) of the
    brightness above ``background`` (intensity-weighted moments)."""
    weight = np.clip(crop.astype(float) - background, 0, None)
    y, x = np.mgrid[0:crop.shape[0], 0:crop.shape[1]]
    total = weight.sum()
    cx, cy = (weight * x).sum() / total, (weight * y).sum() / total
    dx, dy = x - cx, y - cy
    cov = np.array([[(weight * dx * dx).sum(), (weight * dx * dy).sum()],
                    [(weight * dx * dy).sum(), (weight * dy * dy).sum()]]) / total
    eigenvalues, eigenvectors = np.linalg.eigh(cov)
    major = eigenvectors[:, 1]
    angle = (np.degrees(np.arctan2(major[1], major[0])) + 90) % 180 - 90
    return cx, cy, angle, np.sqrt(eigenvalues[1]), np.sqrt(eigenvalues[0])


@pytest.mark.parametrize("angle_deg, scale, eye_distance", [(25.0, 1.0, 40.0), (-35.0, 1.5, 60.0), (0.0, 0.8, 80.0)])
def test_crop_levels_and_centres_a_rotated_mouth(angle_deg, scale, eye_distance):
    angle = np.radians(angle_deg)
    centre = (90.0, 70.0)
    frames = np.stack([_face_frame(160, 180, centre, angle, scale)] * 5)
    landmarks = np.stack([_face_landmarks(centre, angle, scale)] * 5)
    landmarks[2] = np.nan  # a frame without a detection is interpolated

    crops = mouth_crop.crop_mouth_rois(frames, landmarks, eye_distance=eye_distance)
    assert crops.shape == (5, 96, 96) and crops.dtype == np.uint8
    crop_scale = eye_distance / 40  # crop pixels per face pixel
    for crop in crops:
        cx, cy, blob_angle, major_std, minor_std = _blob_moments(crop)
        assert abs(cx - 47.5) < 0.1 and abs(cy - 47.5) < 0.1
        assert abs(blob_angle) < 0.3
        # A filled ellipse with semi-axis a has std a / 2 along it (bilinear blur widens it a little).
        assert major_std == pytest.approx(12 * crop_scale / 2, rel=0.03)
        assert minor_std == pytest.approx(4 * crop_scale / 2, rel=0.08)


def test_interpolation_and_smoothing_known_answers():
    landmarks = np.zeros((5, 68, 2))
    landmarks[:, :, 0] = np.array([np.nan, 2.0, np.nan, np.nan, 8.0])[:, None]
    landmarks[:, :, 1] = 1.0
    filled = mouth_crop.interpolate_missing(landmarks)
    assert np.allclose(filled[:, 0, 0], [2, 2, 4, 6, 8]) and np.allclose(filled[..., 1], 1)
    with pytest.raises(ValueError, match="no frame has landmarks"):
        mouth_crop.interpolate_missing(np.full((3, 68, 2), np.nan))

    track = np.arange(10.0)[:, None, None] * np.ones((1, 68, 2))
    smoothed = mouth_crop.smooth_landmarks(track, window=3)
    assert np.allclose(smoothed[:, 0, 0], [0.5, 1, 2, 3, 4, 5, 6, 7, 8, 8.5])
    assert np.allclose(mouth_crop.smooth_landmarks(np.ones((4, 68, 2)), window=12), 1)
    assert np.allclose(mouth_crop.smooth_landmarks(track, window=12)[0, 0, 0], np.mean(np.arange(7)))


def test_fixed_box_resamples_the_given_square():
    ramp = np.tile(np.arange(128, dtype=np.uint8), (64, 1))  # pixel value = x
    frames = np.stack([ramp] * 2)
    crops = mouth_crop.crop_mouth_rois(frames, None, fixed_box=(16, 8, 48))
    # Crop column j samples x = 16 + (j + 0.5) * 48 / 96 - 0.5.
    assert np.abs(crops[0, 50].astype(float) - (15.75 + 0.5 * np.arange(96))).max() <= 0.5
    default = mouth_crop.crop_mouth_rois(frames, np.full((2, 68, 2), np.nan), fixed_box=True)
    # Default box: side 32, centred horizontally -> x from 48 to 80.
    assert default[0, 0, 0] == pytest.approx(48, abs=1) and default[0, 0, -1] == pytest.approx(79, abs=1)
    with pytest.raises(ValueError, match="use a fixed box"):
        mouth_crop.crop_mouth_rois(frames, None)


def test_mouth_crop_cli_writes_96px_gray_25fps_with_audio(tmp_path):
    video = tmp_path / "in" / "clip.mp4"
    frames = np.stack([_face_frame(64, 64, (32.0, 24.0), 0.3, 0.4)] * 10)
    os.makedirs(video.parent)
    media.write_video(str(video), frames, fps=50, audio=np.zeros(3200, np.float32))
    np.save(tmp_path / "in" / "clip.npy", np.stack([_face_landmarks((32.0, 24.0), 0.3, 0.4)] * 10))
    _write_clip(tmp_path / "in" / "sub" / "nolandmarks.mp4", 4)

    with pytest.raises(SystemExit, match=r"nolandmarks\.mp4: no landmarks file .*nolandmarks\.npy.*--fixed-box"):
        mouth_crop.main([str(tmp_path / "in"), str(tmp_path / "out")])
    mouth_crop.main([str(tmp_path / "in"), str(tmp_path / "out"), "--fixed-box"])

    info = media.probe(str(tmp_path / "out" / "clip.mp4"))
    assert (info.width, info.height, info.video_fps) == (96, 96, 25.0)
    assert media.count_video_frames(str(tmp_path / "out" / "clip.mp4")) == 5  # 10 frames at 50 fps
    assert info.has_audio and media.count_audio_samples(str(tmp_path / "out" / "clip.mp4")) == 3200
    crop = media.read_video(str(tmp_path / "out" / "clip.mp4"), gray=True)[0]
    cx, cy, blob_angle, _, _ = _blob_moments(crop)
    assert abs(cx - 47.5) < 1.5 and abs(cy - 47.5) < 1.5 and abs(blob_angle) < 3
    assert media.count_video_frames(str(tmp_path / "out" / "sub" / "nolandmarks.mp4")) == 4
