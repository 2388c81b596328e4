"""Hostile inputs through training: a small corpus of good clips mixed with broken media files
and malformed manifest rows, trained through fairseq's hydra entry point with the tiny
Synchformer (``av_sync_pretraining``) and AV-data2vec (``av_speech_recognition``) recipes.

What each case does (``task.skip_invalid`` on / off):
- broken media (truncated, zero-byte, text named .mp4, video without its audio stream, an
  audio-only file as video, NaN/inf audio samples), and clips shorter than the model needs:
  skipped, counted and logged with the reason / training stops at the first one, naming the
  file and the problem;
- malformed rows (missing columns, a non-integer count, a path leaving the manifest root):
  left out when the split loads, counted / the split refuses to load, naming ``file:line``;
- usable oddities (silent audio, a 4000 x 3000 video scaled while decoding, variable frame
  rate resampled by timestamp, a one-frame utterance, words outside the vocabulary): trained;
- whole-file problems (transcripts not matching the rows in number, non-UTF-8 transcripts):
  an error in both modes, saying what to fix, since no row can be trusted.
"""
import logging
import os
import re
import threading
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

import avplugins
from avplugins.data.av_speech_dataset import AVSpeechDataset
from avplugins.data.manifest import ManifestError, write_labels
from avplugins.data.media import MediaError, read_audio, read_video, write_audio, write_video
from avplugins.data.sync_dataset import AVSegmentDataset, ClipSamplingConfig
from avplugins.data.sync_sampling import SegmentLayout
from preprocess.build_vocab import build_vocab

REPO = Path(__file__).resolve().parents[1]
RECIPES = {
    "synchformer": REPO / "examples" / "synchformer" / "conf" / "pretrain",
    "av_data2vec": REPO / "examples" / "av_data2vec" / "conf" / "finetune",
}
FPS, SR, SIZE = 25, 16000, 32
CLIP_FRAMES = 40  # 1.6 s; the Synchformer runs use 2 segments of 16 frames
SAMPLES_PER_FRAME = SR // FPS
WORDS = ["red", "green", "blue", "one", "two", "three", "soon", "again"]
NUM_GOOD = 5
VFR_TIMES_MS = [0, 40, 60, 150, 200, 330, 400, 420, 600, 800, 1000, 1200, 1400, 1590]
UNSKIPPABLE = "rows cannot be skipped"
# a couple of updates; tri_stage (AV-data2vec) needs 3 to give each phase a whole update or none
MAX_UPDATE = {"synchformer": 2, "av_data2vec": 3}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- corpus -----------------------------------------------------------------------------------
def good_media(folder: Path, name: str, seed: int, num_frames: int = CLIP_FRAMES, audio=None):
    """A 32 x 32 gray mp4 of random frames and a wav tone; returns the manifest row."""
    rng = np.random.default_rng(seed)
    write_video(folder / f"{name}.mp4", rng.integers(0, 255, (num_frames, SIZE, SIZE), dtype=np.uint8), FPS)
    if audio is None:
        audio = 0.3 * np.sin(np.arange(num_frames * SAMPLES_PER_FRAME) * 0.05 * (seed + 1))
    write_audio(folder / f"{name}.wav", audio.astype(np.float32), SR)
    return (name, f"media/{name}.mp4", f"media/{name}.wav", num_frames, num_frames * SAMPLES_PER_FRAME)


def write_float_wav(path: Path, samples: np.ndarray) -> None:
    """A 32-bit float wav, which can carry NaN and infinity."""
    with av.open(str(path), "w", format="wav") as container:
        stream = container.add_stream("pcm_f32le", rate=SR, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples[None].astype(np.float32), format="flt", layout="mono")
        frame.sample_rate, frame.pts = SR, 0
        for packet in list(stream.encode(frame)) + list(stream.encode(None)):
            container.mux(packet)


def write_vfr_video(path: Path, times_ms) -> None:
    """Frames at irregular times (ms); frame i has brightness 10 * i + 5."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=FPS)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for index, time_ms in enumerate(times_ms):
            frame = av.VideoFrame.from_ndarray(np.full((SIZE, SIZE), 10 * index + 5, np.uint8), format="gray")
            frame.pts, frame.time_base = time_ms, Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def _truncated(media: Path):
    row = good_media(media, "truncated", seed=11)
    data = (media / "truncated.mp4").read_bytes()
    (media / "truncated.mp4").write_bytes(data[: len(data) // 2])
    return row


def _zero_bytes(media: Path):
    row = good_media(media, "empty", seed=12)
    (media / "empty.mp4").write_bytes(b"")
    return row


def _text_as_mp4(media: Path):
    row = good_media(media, "text", seed=13)
    (media / "text.mp4").write_text("just some words, no video here\n" * 50)
    return row


def _no_audio_stream(media: Path):
    # AV-HuBERT style: one file for both streams
    write_video(media / "mute.mp4", np.zeros((CLIP_FRAMES, SIZE, SIZE), np.uint8), FPS)
    return ("mute", "media/mute.mp4", "media/mute.mp4", CLIP_FRAMES, CLIP_FRAMES * SAMPLES_PER_FRAME)


def _audio_only(media: Path):
    row = good_media(media, "sound", seed=14)
    return ("sound", "media/sound.wav", "media/sound.wav", row[3], row[4])


def _nan_audio(media: Path):
    row = good_media(media, "nan", seed=15)
    samples = np.zeros(row[4], np.float32)
    samples[100], samples[700] = np.nan, np.inf
    write_float_wav(media / "nan.wav", samples)
    return row


def _one_frame(media: Path):
    return good_media(media, "oneframe", seed=16, num_frames=1)


def _huge(media: Path):
    """4000 x 3000, 2 frames: must be scaled while decoding (12 Mpixel frames)."""
    write_video(media / "huge.mp4", np.full((2, 3000, 4000), 128, np.uint8), FPS, video_codec="mpeg4")
    write_audio(media / "huge.wav", np.zeros(2 * SAMPLES_PER_FRAME, np.float32), SR)
    return ("huge", "media/huge.mp4", "media/huge.wav", 2, 2 * SAMPLES_PER_FRAME)


def _silent(media: Path):
    return good_media(media, "silent", seed=17, audio=np.zeros(CLIP_FRAMES * SAMPLES_PER_FRAME))


def _vfr(media: Path):
    write_vfr_video(media / "vfr.mp4", VFR_TIMES_MS)
    good_media(media, "vfr_sound", seed=18)
    return ("vfr", "media/vfr.mp4", "media/vfr_sound.wav", CLIP_FRAMES, CLIP_FRAMES * SAMPLES_PER_FRAME)


MEDIA_CASES = {
    # clip id: (row maker, what the error says, skipped by (synchformer, av_data2vec))
    "truncated": (_truncated, r"truncated\.mp4: .*(truncated|corrupt)", (True, True)),
    "empty": (_zero_bytes, r"empty\.mp4: the file is empty \(0 bytes\)", (True, True)),
    "text": (_text_as_mp4, r"text\.mp4: not a readable media file", (True, True)),
    "mute": (_no_audio_stream, r"mute\.mp4: has no audio stream", (True, True)),
    "sound": (_audio_only, r"sound\.wav: has no video stream", (True, True)),
    "nan": (_nan_audio, r"nan\.wav: the audio has NaN or infinite samples", (True, True)),
    # too short for 2 Synchformer segments; a valid (if short) utterance for AV-data2vec
    "oneframe": (_one_frame, r"line \d+ \(oneframe\): 1 frames is shorter than the 32 frames", (True, False)),
    "huge": (_huge, r"line \d+ \(huge\): 2 frames is shorter than the 32 frames", (True, False)),
    "silent": (_silent, None, (False, False)),
    "vfr": (_vfr, None, (False, False)),
}
# Malformed rows: (line text, what the error says); left out when the split loads.
BAD_ROWS = [
    ("columns\tmedia/good0.mp4\tmedia/good0.wav\t40", r"expected 5 tab-separated columns, found 4"),
    ("count\tmedia/good0.mp4\tmedia/good0.wav\tforty\t25600", r"num_video_frames must be an integer, found 'forty'"),
    ("outside\t../outside.mp4\tmedia/good0.wav\t40\t25600", r"path '../outside.mp4' is outside the manifest root"),
]


def transcript(seed: int) -> str:
    return " ".join(np.random.default_rng(seed).choice(WORDS, size=3))


def write_split(root: Path, split: str, rows, labels) -> None:
    """``{split}.tsv`` (rows: tuples or raw lines) and ``{split}.wrd``."""
    lines = [str(root)] + [row if isinstance(row, str) else "\t".join(map(str, row)) for row in rows]
    (root / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_labels(str(root / f"{split}.wrd"), labels)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Splits: ``good`` (good clips), ``media`` (good clips and every media case), ``hostile``
    (those, malformed rows and out-of-vocabulary words), ``onebroken`` (good clips and a
    truncated file)."""
    root = tmp_path_factory.mktemp("hostile")
    media = root / "media"
    media.mkdir()
    good = [good_media(media, f"good{index}", seed=index) for index in range(NUM_GOOD)]
    good_labels = [transcript(index) for index in range(NUM_GOOD)]
    cases = {name: maker(media) for name, (maker, _, _) in MEDIA_CASES.items()}
    write_split(root, "good", good, good_labels)
    build_vocab(str(root / "good.wrd"), str(root), vocab_size=20)
    assert [row[0] for row in cases.values()] == list(MEDIA_CASES)
    case_labels = [transcript(100 + n) for n in range(len(cases))]
    write_split(root, "media", good + list(cases.values()), good_labels + case_labels)
    rows = good + list(cases.values()) + [line for line, _ in BAD_ROWS]
    labels = good_labels + ["red zebra Ωmega"] + case_labels[1:] + [transcript(0)] * len(BAD_ROWS)
    write_split(root, "hostile", rows, labels)
    write_split(root, "onebroken", good[:2] + [cases["truncated"]], good_labels[:2] + [transcript(0)])
    return root


# --- training through fairseq's entry point ---------------------------------------------------
def train(recipe: str, data: Path, save_dir: Path, split: str, *overrides):
    """fairseq-hydra-train's main on the tiny recipe, training on ``split``."""
    from fairseq.dataclass.initialize import hydra_init
    from fairseq_cli.hydra_train import _hydra_main
    from hydra import compose, initialize_config_dir

    common = [f"task.data={data}", f"common.user_dir={os.path.dirname(avplugins.__file__)}",
              f"checkpoint.save_dir={save_dir}", "checkpoint.no_save=true", f"dataset.train_subset={split}",
              "dataset.disable_validation=true", "common.log_interval=1",
              f"optimization.max_update={MAX_UPDATE[recipe]}"]
    if recipe == "synchformer":
        common += ["++task.num_segments=2", "dataset.batch_size=8"]
    else:
        common += ["model.w2v_path=null"]
    hydra_init("tiny_synthetic")
    with initialize_config_dir(config_dir=str(RECIPES[recipe]), version_base=None):
        cfg = compose(config_name="tiny_synthetic", overrides=common + list(overrides))
    _hydra_main(cfg)


SKIP_LOG = re.compile(r"skipping (\S+) line (\d+) \((\w+)\): (.*); (\d+) of (\d+) rows of this manifest skipped so far")


@pytest.mark.parametrize("recipe", ["synchformer", "av_data2vec"])
def test_skip_invalid_trains_and_counts_every_skipped_row(corpus, tmp_path, caplog, recipe):
    caplog.set_level(logging.INFO)
    train(recipe, corpus, tmp_path, "hostile", "++task.skip_invalid=true")  # not in the recipes yet
    log = caplog.text
    assert "done training" in log and re.search(rf"\| num_updates {MAX_UPDATE[recipe]} \|", log), log[-3000:]
    # malformed rows: left out when the split loads, with a count and each reason
    assert re.search(rf"hostile\.tsv: {NUM_GOOD + len(MEDIA_CASES)} rows ok, {len(BAD_ROWS)} skipped", log)
    for _, problem in BAD_ROWS:
        assert re.search(problem, log), problem
    # media: each broken row skipped once, with its reason and a running count
    column = 0 if recipe == "synchformer" else 1
    expected = {name for name, (_, _, skipped) in MEDIA_CASES.items() if skipped[column]}
    skips = SKIP_LOG.findall(log)
    reasons = {clip_id: reason for _, _, clip_id, reason, _, _ in skips}
    assert set(reasons) == expected
    for clip_id in expected:
        assert re.search(MEDIA_CASES[clip_id][1], reasons[clip_id]), (clip_id, reasons[clip_id])
    assert sorted(int(count) for *_, count, _ in skips) == list(range(1, len(expected) + 1))
    assert {int(total) for *_, total in skips} == {NUM_GOOD + len(MEDIA_CASES)}
    if recipe == "av_data2vec":
        assert re.search(r"hostile\.wrd: \d+ pieces are not in the dictionary and became <unk>", log)


@pytest.mark.parametrize("recipe", ["synchformer", "av_data2vec"])
def test_without_skip_invalid_the_first_broken_row_stops_training(corpus, tmp_path, recipe):
    with pytest.raises(ManifestError, match=r"hostile\.tsv:\d+: expected 5 tab-separated columns, found 4 "
                                            r"\(2 more problems in this file\)\. .*task\.skip_invalid=true skips"):
        train(recipe, corpus, tmp_path, "hostile")
    with pytest.raises(MediaError, match=MEDIA_CASES["truncated"][1]):
        train(recipe, corpus, tmp_path, "onebroken")


def test_transcripts_that_do_not_match_the_rows_are_an_error_even_when_skipping(corpus, tmp_path):
    from fairseq import tasks
    from omegaconf import OmegaConf

    task = tasks.setup_task(OmegaConf.create({"_name": "av_speech_recognition", "data": str(corpus), "seed": 1,
                                              "train_subset": "good", "skip_invalid": True,
                                              "tokenizer_model": str(next(corpus.glob("*.model")))}))
    labels = (corpus / "good.wrd").read_bytes()
    try:
        (corpus / "good.wrd").write_bytes(labels + b"one more line\n")
        with pytest.raises(ManifestError, match=rf"good\.wrd:{NUM_GOOD + 2}: {NUM_GOOD + 1} transcript lines but "
                                                rf".*good\.tsv has {NUM_GOOD} rows\. .*{UNSKIPPABLE}"):
            task.load_dataset("good")
        (corpus / "good.wrd").write_bytes(labels.replace(b"green", b"gr\xfcn", 1))
        assert b"gr\xfcn" in (corpus / "good.wrd").read_bytes()
        with pytest.raises(ManifestError, match=r"good\.wrd:\d+: not valid UTF-8 \(byte 0xfc.*Re-save the file as UTF-8"):
            task.load_dataset("good")
    finally:
        (corpus / "good.wrd").write_bytes(labels)


# --- the cases one by one, at the dataset ------------------------------------------------------
def speech_dataset(corpus, split, **kwargs):
    return AVSpeechDataset(str(corpus / f"{split}.tsv"), ["audio", "video"], train=False, image_size=SIZE,
                           crop_size=28, **kwargs)


def clip_dataset(corpus, split, **kwargs):
    layout = SegmentLayout(num_segments=2, segment_frames=16, stride_frames=16)
    return AVSegmentDataset(str(corpus / f"{split}.tsv"),
                            ClipSamplingConfig(layout=layout, crop_size=SIZE, resize_short_side=48, **kwargs),
                            train=False)


@pytest.mark.parametrize("clip_id", [clip_id for clip_id, (_, problem, _) in MEDIA_CASES.items() if problem])
def test_each_broken_row_names_its_file_and_problem(corpus, clip_id):
    _, problem, (skipped_by_synchformer, skipped_by_data2vec) = MEDIA_CASES[clip_id]
    row = NUM_GOOD + list(MEDIA_CASES).index(clip_id)
    for make, skipped in [(clip_dataset, skipped_by_synchformer), (speech_dataset, skipped_by_data2vec)]:
        strict, lenient = make(corpus, "media"), make(corpus, "media", skip_invalid=True)
        assert strict.entries[row].id == clip_id
        if skipped:
            with pytest.raises((MediaError, ValueError), match=problem):
                strict[row]
            assert lenient[row] is None and lenient.num_skipped == 1  # evaluation: left out
        else:
            assert lenient[row] is not None


def test_usable_oddities_give_valid_items(corpus):
    speech = speech_dataset(corpus, "hostile", skip_invalid=True)
    clips = clip_dataset(corpus, "hostile", skip_invalid=True)
    index = {entry.id: number for number, entry in enumerate(speech.entries)}
    for clip_id in ("silent", "vfr", "huge", "oneframe"):
        item = speech[index[clip_id]]
        assert torch.isfinite(item["audio"]).all() and torch.isfinite(item["video"]).all(), clip_id
        assert item["video"].shape[-2:] == (28, 28) and len(item["audio"]) == item["num_frames"], clip_id
    assert speech[index["huge"]]["num_frames"] == 2 and speech[index["oneframe"]]["num_frames"] == 1
    silent = clips[index["silent"]]
    assert torch.isfinite(silent["audio"]).all() and silent["video"].shape == (2, 16, 3, SIZE, SIZE)
    # variable frame rate: output frame k shows the latest input frame at or before k / 25 s
    frames = read_video(corpus / "media" / "vfr.mp4", fps=FPS, gray=True)[:CLIP_FRAMES]
    times_ms = np.array(VFR_TIMES_MS)
    expected = 10 * (np.searchsorted(times_ms, np.arange(CLIP_FRAMES) * 40, side="right") - 1) + 5
    np.testing.assert_allclose(frames.mean(axis=(1, 2)), expected, atol=3)
    assert len(clips[index["vfr"]]["video"]) == 2


def test_training_replaces_a_skipped_row_so_batches_stay_full(corpus):
    dataset = AVSpeechDataset(str(corpus / "onebroken.tsv"), ["audio", "video"], train=True, image_size=SIZE,
                              crop_size=28, skip_invalid=True)
    items = [dataset[index] for index in range(3)]
    assert all(item is not None for item in items) and dataset.num_skipped == 1
    assert items[2]["id"] == 0  # the truncated row's place taken by the next good one
    assert dataset[2]["id"] == items[2]["id"] and dataset.num_skipped == 1  # not decoded again


def test_a_split_where_nothing_loads_is_an_error(tmp_path, corpus):
    rows = [line for line in (corpus / "hostile.tsv").read_text().splitlines()[1:] if "/truncated" in line or "/empty" in line]
    (tmp_path / "broken.tsv").write_text(f"{corpus}\n" + "\n".join(rows) + "\n")
    dataset = AVSpeechDataset(str(tmp_path / "broken.tsv"), ["audio", "video"], train=True, skip_invalid=True)
    with pytest.raises(ManifestError, match=r"broken\.tsv: none of its 2 rows could be loaded"):
        dataset[0]


# --- decoding limits -------------------------------------------------------------------------
def test_a_named_pipe_is_refused_instead_of_blocking(tmp_path):
    """FFmpeg blocks forever opening a pipe without a writer: refused before it is opened."""
    fifo = tmp_path / "stream.mp4"
    os.mkfifo(fifo)
    errors = []

    def read():
        try:
            read_audio(fifo)
        except MediaError as error:
            errors.append(str(error))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=10)
    if reader.is_alive():  # unblock the reader so that the test process can end
        with open(fifo, "wb"):
            pass
        pytest.fail("reading a named pipe blocked")
    assert errors and re.search(r"stream\.mp4: is not a regular file \(a named pipe", errors[0])


def test_full_resolution_frames_beyond_the_memory_limit_are_refused(corpus, monkeypatch):
    from avplugins.data import media

    path = corpus / "media" / "huge.mp4"
    monkeypatch.setattr(media, "MAX_DECODED_BYTES", 4000 * 3000 * 3 * 2 - 1)  # less than its 2 RGB frames
    with pytest.raises(MediaError, match=r"huge\.mp4: more than .* GiB of decoded 4000x3000 frames .*size="):
        read_video(path)
    assert read_video(path, size=(30, 40)).shape == (2, 30, 40, 3)  # scaled while decoding: fine
