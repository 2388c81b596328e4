"""The synthetic corpus generator: files, counts, determinism, A/V alignment, lip motion."""
import os

import numpy as np
import pytest

from avplugins.data.manifest import read_labels, read_manifest
from avplugins.data.media import count_audio_samples, count_video_frames, probe, read_audio, read_video
from preprocess.synth import sparse, speech, visemes
from preprocess.synth.common import clip_rng
from preprocess.synthetic import SPLITS, clip_plan, main

SPEECH_ARGS = ["--num-clips", "4", "--min-duration", "1.5", "--max-duration", "2.0",
               "--valid-fraction", "0.25", "--test-fraction", "0.25"]
SPARSE_ARGS = ["--num-clips", "3", "--min-duration", "3.0", "--max-duration", "3.0",
               "--valid-fraction", "0.34", "--test-fraction", "0.0", "--image-size", "64"]


def _generate(root, kind, args, seed, workers):
    out = str(root / f"{kind}_seed{seed}_workers{workers}")
    main([kind, "--out", out, "--seed", str(seed), "--workers", str(workers), *args])
    return out


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return {
        "speech": _generate(root, "speech", SPEECH_ARGS, seed=3, workers=1),
        "speech_workers2": _generate(root, "speech", SPEECH_ARGS, seed=3, workers=2),
        "speech_seed4": _generate(root, "speech", SPEECH_ARGS, seed=4, workers=1),
        "sparse": _generate(root, "sparse", SPARSE_ARGS, seed=5, workers=1),
        "sparse_workers2": _generate(root, "sparse", SPARSE_ARGS, seed=5, workers=2),
    }


def _entries(corpus):
    """{split: manifest entries}."""
    return {split: read_manifest(os.path.join(corpus, f"{split}.tsv"))[1] for split in SPLITS}


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def test_clip_plan_splits_in_order_and_keeps_a_training_clip():
    assert [split for _, split, _ in clip_plan(10, 0.1, 0.2)] == ["train"] * 7 + ["valid"] + ["test"] * 2
    assert [split for _, split, _ in clip_plan(3, 0.01, 0.01)] == ["train", "valid", "test"]
    with pytest.raises(ValueError, match="leaves no training clip"):
        clip_plan(2, 0.3, 0.3)


@pytest.mark.parametrize("kind", ["speech", "sparse"])
def test_manifest_counts_equal_decoded_media(corpora, kind):
    entries = _entries(corpora[kind])
    assert [len(entries[split]) for split in SPLITS] == ([2, 1, 1] if kind == "speech" else [2, 1, 0])
    for entry in (e for split in SPLITS for e in entries[split]):
        assert entry.video_path.endswith(".mp4") and entry.audio_path.endswith(".wav")
        assert entry.num_audio_samples == 640 * entry.num_video_frames
        assert count_video_frames(entry.video_path) == entry.num_video_frames
        assert len(read_video(entry.video_path, fps=25.0)) == entry.num_video_frames
        assert count_audio_samples(entry.audio_path) == entry.num_audio_samples
        assert abs(count_audio_samples(entry.video_path) - entry.num_audio_samples) <= 640  # muxed AAC copy


def test_speech_labels_vocabulary_and_fairseq_dictionary(corpora):
    from fairseq.data import Dictionary
    import sentencepiece

    corpus = corpora["speech"]
    entries = _entries(corpus)
    spm = sentencepiece.SentencePieceProcessor(model_file=os.path.join(corpus, "spm_unigram1000.model"))
    dictionary = Dictionary.load(os.path.join(corpus, "dict.wrd.txt"))
    for split in SPLITS:
        labels = read_labels(os.path.join(corpus, f"{split}.wrd"), num_entries=len(entries[split]))
        for label in labels:
            assert label and set(label.split()) <= set(speech.VOCABULARY)
            if split == "train":  # the vocabulary is trained on train.wrd: it covers every piece there
                pieces = spm.encode(label, out_type=str)
                assert spm.decode(pieces) == label
                assert all(dictionary.index(piece) != dictionary.unk() for piece in pieces)


def test_speech_audio_is_speech_like(corpora):
    for entry in _entries(corpora["speech"])["train"]:
        info = probe(entry.audio_path)
        assert (info.audio_sample_rate, info.audio_channels) == (16000, 1)
        audio = read_audio(entry.audio_path)
        assert len(audio) == entry.num_audio_samples
        frame_rms = np.sqrt(np.mean(audio.reshape(-1, 640).astype(np.float64) ** 2, axis=1))
        assert frame_rms.max() > 0.03  # not silent
        assert np.percentile(frame_rms, 10) < 0.2 * frame_rms.max()  # pauses between and around words
        power = np.abs(np.fft.rfft(audio.astype(np.float64))) ** 2
        frequencies = np.fft.rfftfreq(len(audio), 1 / 16000)
        assert power[(frequencies > 80) & (frequencies < 4000)].sum() > 0.7 * power.sum()
        muxed = read_audio(entry.video_path)[: len(audio)]
        assert np.corrcoef(muxed, audio[: len(muxed)])[0, 1] > 0.9


def _mouth_darkness(frames):
    """Mean darkness (255 - gray) of the central third of each frame (T,)."""
    size = frames.shape[1]
    centre = frames[:, size // 3 : 2 * size // 3, size // 4 : 3 * size // 4].astype(np.float64)
    return 255.0 - centre.mean(axis=(1, 2))


def test_mouth_opens_while_speaking(corpora):
    for entry in (e for entries in _entries(corpora["speech"]).values() for e in entries):
        darkness = _mouth_darkness(read_video(entry.video_path, gray=True))
        audio = read_audio(entry.audio_path).reshape(-1, 640)
        speaking = np.sqrt(np.mean(audio.astype(np.float64) ** 2, axis=1))
        speaking = speaking > 0.1 * speaking.max()
        # frames at least 3 frames (120 ms) from any speech: the mouth has settled at rest
        near_speech = np.convolve(speaking, np.ones(7), mode="same") > 0
        assert speaking.sum() >= 5 and (~near_speech).sum() >= 1
        assert darkness[speaking].mean() > darkness[~near_speech].mean() + 2.0


def test_different_words_look_different():
    """Same speaker, voice and head motion (same random stream); rounded "two" vs spread "three"."""
    options = speech.SpeechOptions(1.5, 1.5, 96)
    rounded = speech.make_speech_clip(clip_rng(0, 0), options, words=["two", "two"])
    spread = speech.make_speech_clip(clip_rng(0, 0), options, words=["three", "three"])
    assert rounded.video.shape == spread.video.shape
    np.testing.assert_array_equal(rounded.video[:, :8, :8], spread.video[:, :8, :8])  # same skin, noise, pose
    during = slice(int(rounded.speech_start_s * 25) + 3, int(min(rounded.speech_end_s, spread.speech_end_s) * 25) - 2)

    def mouth_width(frames):
        """Mean over frames of the widest row of pixels clearly darker than the skin (the lips)."""
        skin = np.median(frames[:, :, :10], axis=(1, 2))[:, None, None]
        rows = frames[:, 30:70].astype(np.float64)
        return (rows < skin - 15).sum(axis=2).max(axis=1).mean()

    assert mouth_width(rounded.video[during]) < 0.8 * mouth_width(spread.video[during])


def test_visemes_of_espeak_phonemes():
    assert visemes.visemes_of_phoneme("p") == ["bilabial"]
    assert visemes.visemes_of_phoneme("'aI") == ["a", "I"]
    assert visemes.visemes_of_phoneme("@L") == ["@", "lateral"]
    assert visemes.visemes_of_phoneme("_:") == ["rest"]
    assert visemes.visemes_of_phoneme("t2") == ["alveolar"]
    segments = visemes.phonemes_to_segments(speech.speak(["bob"], speech.Voice("en-us", 150, 50, 0)).phonemes)
    shape = visemes.viseme_trajectory(segments, np.arange(0.0, segments[-1].end_s, 0.005))
    opening = shape[:, visemes.PARAMETERS.index("opening")]
    # b-o-b: closed, open, closed again
    peak = np.argmax(opening)
    assert opening[peak] > 0.4 and opening[:peak].min() < 0.05 and opening[peak:].min() < 0.05


@pytest.mark.parametrize("kind", ["speech", "sparse"])
def test_deterministic_for_a_seed_whatever_the_workers(corpora, kind):
    one, two = corpora[kind], corpora[f"{kind}_workers2"]
    text_files = [f"{split}.tsv" for split in SPLITS]
    text_files += [f"{split}.wrd" for split in SPLITS] + ["dict.wrd.txt"] if kind == "speech" else \
        [f"{split}.events.tsv" for split in SPLITS]
    for name in text_files:
        assert _read(os.path.join(one, name)) == _read(os.path.join(two, name)), name
    for entry in _entries(one)["train"]:
        relative = os.path.relpath(entry.video_path, one)
        np.testing.assert_array_equal(read_video(entry.video_path), read_video(os.path.join(two, relative)))
        assert _read(entry.audio_path) == _read(os.path.join(two, os.path.relpath(entry.audio_path, one)))


def test_other_seed_gives_other_corpus(corpora):
    one, other = corpora["speech"], corpora["speech_seed4"]
    assert _read(os.path.join(one, "train.wrd")) != _read(os.path.join(other, "train.wrd"))
    first, first_other = _entries(one)["train"][0], _entries(other)["train"][0]
    assert not np.array_equal(read_video(first.video_path)[:10], read_video(first_other.video_path)[:10])


def test_rerun_is_a_no_op_and_other_arguments_are_refused(corpora, capsys):
    corpus = corpora["sparse"]
    manifest = os.path.join(corpus, "train.tsv")
    modified = os.stat(manifest).st_mtime_ns
    main(["sparse", "--out", corpus, "--seed", "5", "--workers", "2", *SPARSE_ARGS])
    assert "nothing to do" in capsys.readouterr().out
    assert os.stat(manifest).st_mtime_ns == modified
    with pytest.raises(SystemExit, match="already holds a different corpus.*seed"):
        main(["sparse", "--out", corpus, "--seed", "6", *SPARSE_ARGS])


def test_bad_arguments_are_explained(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["sparse", "--out", str(tmp_path), "--num-clips", "2", "--max-duration", "0.5", "--min-duration", "0.5"])
    assert "--min-duration >=" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["speech", "--out", str(tmp_path), "--num-clips", "2", "--image-size", "95"])
    assert "--image-size must be even" in capsys.readouterr().err


def _onset_s(audio, around_s, window_s=0.2):
    """First time in [around - window, around + window] where the 5 ms RMS envelope reaches half
    its maximum there."""
    start = int((around_s - window_s) * 16000)
    segment = audio[start : int((around_s + window_s) * 16000)].astype(np.float64)
    envelope = np.sqrt(np.convolve(segment**2, np.ones(80) / 80, mode="same"))
    return (start + np.argmax(envelope >= 0.5 * envelope.max())) / 16000


def test_flash_is_seen_and_heard_at_its_event_time(corpora):
    corpus = corpora["sparse"]
    events = {}
    for split in SPLITS:
        events.update(sparse.read_events(os.path.join(corpus, f"{split}.events.tsv")))
    entries = {e.id: e for split in SPLITS for e in _entries(corpus)[split]}
    assert set(events) == set(entries)
    flashes = [(clip_id, t) for clip_id, clip_events in events.items() for kind, t in clip_events if kind == "flash"]
    assert flashes, "seed 5 should give at least one flash"
    for clip_id, event_s in flashes:
        entry = entries[clip_id]
        brightness = read_video(entry.video_path).astype(np.float64).mean(axis=(1, 2, 3))
        window = range(max(1, round(event_s * 25) - 5), min(len(brightness), round(event_s * 25) + 6))
        seen_s = max(window, key=lambda k: brightness[k] - brightness[k - 1]) / 25
        heard_s = _onset_s(read_audio(entry.audio_path), event_s)
        heard_in_mp4_s = _onset_s(read_audio(entry.video_path), event_s)
        for time_s in (seen_s, heard_s, heard_in_mp4_s):
            assert abs(time_s - event_s) <= 0.04, (clip_id, event_s, seen_s, heard_s, heard_in_mp4_s)
        assert abs(seen_s - heard_s) <= 0.04


def test_events_file_round_trip_and_errors(tmp_path):
    path = str(tmp_path / "train.events.tsv")
    sparse.write_events(path, [("a", (("ball", 1.0), ("door", 2.04))), ("b", ()), ("c", (("flash", 0.8),))])
    assert sparse.read_events(path) == {"a": [("ball", 1.0), ("door", 2.04)], "c": [("flash", 0.8)]}
    with open(path, "a") as f:
        f.write("d\tbang\t1.0\n")
    with pytest.raises(ValueError, match=r"train.events.tsv:4: expected .*found 'd\\tbang\\t1.0'"):
        sparse.read_events(path)


def test_sparse_events_are_apart_and_inside_the_clip(corpora):
    corpus = corpora["sparse"]
    entries = {e.id: e for split in SPLITS for e in _entries(corpus)[split]}
    for clip_id, clip_events in sparse.read_events(os.path.join(corpus, "train.events.tsv")).items():
        times = [t for _, t in clip_events]
        assert 1 <= len(times) <= sparse.MAX_EVENTS
        assert all(later - earlier >= sparse.MIN_EVENT_GAP_S - 1e-9 for earlier, later in zip(times, times[1:]))
        assert 0 < times[0] and times[-1] < entries[clip_id].num_video_frames / 25
