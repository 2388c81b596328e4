"""The optimised data loading gives the items of the straightforward version.

The references below are the implementations the fast paths replaced, kept here verbatim in
spirit (plain float arithmetic, one full-size copy per step): the Synchformer video transform
(float conversion before crop / flip, segments cut from the normalised float clip), the float64
AV-HuBERT grayscale normalisation, ``python_speech_features.logfbank`` as the oracle of the
filterbank with framing by strided views, and FFmpeg's default probing for WAV files opened
from their header. Items of both datasets are compared end to end on clips written here, the
Synchformer ones also as uint8 frames normalised where the batch meets the model
(``transforms.normalized_segments``).
"""
import numpy as np
import pytest
import python_speech_features
import torch

from avplugins.data import media
from avplugins.data import transforms as tr
from avplugins.data.av_speech_dataset import AVSpeechDataset
from avplugins.data.features import (
    align_to_video,
    av_data2vec_audio_features,
    logfbank_features,
    normalize_frames,
    stack_frames,
)
from avplugins.data.manifest import write_manifest
from avplugins.data.media import write_audio, write_video
from avplugins.data.sync_dataset import AVOffsetDataset, AVSegmentDataset, ClipSamplingConfig
from avplugins.data.sync_sampling import SegmentLayout, segment_start_frames

FPS, SR = 25, 16000


# --- references: the straightforward versions ----------------------------------------------
def reference_synchformer_video_transform(frames, crop_size, train=False, rng=None, color_augment=False,
                                          small_crop_p=0.0):
    """The former transform: crop on uint8, then the whole clip to float, colour / flip per
    clip on floats, stack, normalise."""
    video = tr.rgb_frames_to_tensor(frames)
    if not train:
        return tr.normalize_rgb(tr.center_crop(video, crop_size).float() / 255.0)
    video = tr.synchformer_train_crop(video, crop_size, rng, small_crop_p).float() / 255.0
    clips = []
    for clip in video.reshape(-1, *video.shape[-4:]):
        if color_augment:
            clip = tr.random_color_distortion(clip, rng)
        if rng.random() < tr.FLIP_P:
            clip = tr.horizontal_flip(clip)
        clips.append(clip)
    return tr.normalize_rgb(torch.stack(clips).reshape(video.shape))


def reference_normalize_gray(frames: np.ndarray) -> np.ndarray:
    return ((frames / 255.0 - tr.GRAY_MEAN) / tr.GRAY_STD).astype(np.float32)


def reference_logfbank(samples: np.ndarray) -> np.ndarray:
    return python_speech_features.logfbank(samples.astype(np.float64) * 32768.0, samplerate=SR).astype(np.float32)


def reference_av_data2vec_audio_features(samples: np.ndarray, num_video_frames: int) -> np.ndarray:
    return normalize_frames(align_to_video(stack_frames(reference_logfbank(samples)), num_video_frames))


def _rgb_frames(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# --- Synchformer transform -----------------------------------------------------------------
def test_uint8_normalisation_is_bit_equal_for_every_value():
    values = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(1, 3, 16, 16)
    expected = tr.normalize_rgb(values.float() / 255.0)
    assert torch.equal(tr.uint8_to_normalized_rgb(values), expected)
    out = torch.full((1, 3, 16, 16), float("nan"))
    assert tr.uint8_to_normalized_rgb(values, out=out) is out and torch.equal(out, expected)


@pytest.mark.parametrize("small_crop_p", [0.0, 0.5])
def test_stage2_clip_then_segments_is_bit_equal_to_the_reference(small_crop_p):
    frames = _rgb_frames((30, 40, 44, 3))
    starts = np.array([0, 4, 8, 14])
    index = torch.as_tensor(starts[:, None] + np.arange(16))
    for seed in range(12):
        expected = reference_synchformer_video_transform(
            frames, 32, True, np.random.default_rng(seed), small_crop_p=small_crop_p)[index]
        ours = tr.synchformer_video_transform(frames, 32, True, np.random.default_rng(seed),
                                              small_crop_p=small_crop_p, segment_starts=starts, segment_frames=16)
        assert ours.shape == (4, 16, 3, 32, 32) and ours.is_contiguous()
        assert torch.equal(ours, expected), seed
    evaluated = tr.synchformer_video_transform(frames, 32, segment_starts=starts, segment_frames=16)
    assert torch.equal(evaluated, reference_synchformer_video_transform(frames, 32)[index])


def test_whole_clip_and_eval_are_bit_equal_to_the_reference():
    frames = _rgb_frames((6, 40, 48, 3), seed=1)
    assert torch.equal(tr.synchformer_video_transform(frames, 32), reference_synchformer_video_transform(frames, 32))
    for seed in range(6):
        ours = tr.synchformer_video_transform(frames, 32, True, np.random.default_rng(seed))
        assert torch.equal(ours, reference_synchformer_video_transform(frames, 32, True, np.random.default_rng(seed)))


def test_stage1_segments_with_colour_distortion_equal_the_reference():
    """Per-segment flips and colour draws consume the generator in the same order; segments
    without a colour distortion are bit-equal, distorted ones equal within float rounding."""
    frames = _rgb_frames((3, 4, 40, 40, 3), seed=2)  # (S, T, H, W, 3)
    num_distorted = 0
    for seed in range(40):
        rng, reference_rng = np.random.default_rng(seed), np.random.default_rng(seed)
        ours = tr.synchformer_video_transform(frames, 32, True, rng, color_augment=True,
                                              small_crop_p=tr.STAGE1_SMALL_CROP_P)
        expected = reference_synchformer_video_transform(frames, 32, True, reference_rng, color_augment=True,
                                                         small_crop_p=tr.STAGE1_SMALL_CROP_P)
        assert rng.random() == reference_rng.random()  # the same number of draws
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
        num_distorted += int(sum(not torch.equal(a, b) for a, b in zip(ours, expected)) > 0)
    assert num_distorted < 40  # most clips take the exact uint8 path


@pytest.mark.parametrize("shape,starts", [((30, 40, 44, 3), None), ((30, 40, 44, 3), [0, 6, 14]),
                                          ((3, 8, 40, 44, 3), None)])
def test_uint8_frames_normalise_to_the_reference(shape, starts):
    """normalize=False gives the cropped and flipped uint8 frames, laid out as decoded (H, W, 3),
    drawing the same random numbers: normalised where the batch meets the model, bit-equal."""
    frames = _rgb_frames(shape, seed=4)
    segments = None if starts is None else torch.as_tensor(np.array(starts)[:, None] + np.arange(16))
    for seed in range(8):
        rng, reference_rng = np.random.default_rng(seed), np.random.default_rng(seed)
        ours = tr.synchformer_video_transform(frames, 32, True, rng, small_crop_p=0.5, normalize=False,
                                              segment_starts=starts, segment_frames=16 if starts else None)
        expected = reference_synchformer_video_transform(frames, 32, True, reference_rng, small_crop_p=0.5)
        expected = expected if segments is None else expected[segments]
        assert rng.random() == reference_rng.random()  # the same number of draws
        assert ours.dtype == torch.uint8 and ours.shape == expected.shape and ours.movedim(-3, -1).is_contiguous()
        assert torch.equal(tr.normalized_segments(ours[None])[0], expected), seed
    evaluated = tr.synchformer_video_transform(frames, 32, normalize=False)
    assert torch.equal(tr.normalized_segments(evaluated[None])[0], reference_synchformer_video_transform(frames, 32))


def test_segments_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match=r"segments of 16 frames starting at \[0, 20\] do not fit in a clip of 30"):
        tr.synchformer_video_transform(_rgb_frames((30, 40, 40, 3)), 32, segment_starts=[0, 20], segment_frames=16)


# --- AV-data2vec video and audio -----------------------------------------------------------
def test_gray_lookup_is_bit_equal_to_float64_arithmetic():
    values = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(tr.normalize_gray(values), reference_normalize_gray(values))
    frames = _rgb_frames((5, 96, 96), seed=3)
    for seed in range(4):
        ours = tr.av_data2vec_video_transform(frames, True, np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        crop = tr.random_crop(frames, 88, rng)
        crop = tr.horizontal_flip(crop) if rng.random() < tr.FLIP_P else crop
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours, reference_normalize_gray(crop))


@pytest.mark.parametrize("num_samples", [1, 399, 400, 401, 16000, 47360, 16081])
def test_logfbank_equals_python_speech_features(num_samples):
    samples = 0.3 * np.random.default_rng(num_samples).standard_normal(num_samples).astype(np.float32)
    samples[: num_samples // 3] = 0.0  # silence: the log of the zero-energy guard
    # the same float64 operations in the same order: bit-equal, not just within tolerance
    np.testing.assert_array_equal(logfbank_features(samples), reference_logfbank(samples))


def test_audio_features_equal_the_reference_chain():
    samples = 0.2 * np.random.default_rng(5).standard_normal(2 * SR + 123).astype(np.float32)
    for num_video_frames in (40, 50, 60):
        np.testing.assert_array_equal(av_data2vec_audio_features(samples, num_video_frames),
                                      reference_av_data2vec_audio_features(samples, num_video_frames))


# --- datasets end to end -------------------------------------------------------------------
def _write_clip(folder, clip_id, frames, seconds, seed):
    audio = (0.2 * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)
    write_video(folder / f"{clip_id}.mp4", frames, FPS)
    write_audio(folder / f"{clip_id}.wav", audio, SR)
    return clip_id, f"{clip_id}.mp4", f"{clip_id}.wav", len(frames), len(audio)


@pytest.fixture(scope="module")
def rgb_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("rgb")
    rows = [_write_clip(root, f"c{n}", _rgb_frames((60, 40, 48, 3), seed=n), 2.4, n) for n in range(2)]
    write_manifest(str(root / "train.tsv"), ".", rows)
    return root


@pytest.fixture(scope="module")
def gray_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("gray")
    rows = [_write_clip(root, f"g{n}", _rgb_frames((30 + 7 * n, 96, 96), seed=n), (30 + 7 * n) / FPS, n)
            for n in range(2)]
    write_manifest(str(root / "train.tsv"), ".", rows)
    return root


LAYOUT = SegmentLayout(num_segments=4, segment_frames=8, stride_frames=4)


@pytest.mark.parametrize("stage,color_augment,uint8_video", [
    ("offset", False, False), ("offset", False, True),
    ("segment", True, False), ("segment", True, True), ("segment", False, True),
])
def test_sync_items_equal_the_reference(rgb_corpus, stage, color_augment, uint8_video):
    """Float items, or uint8 items as the models normalise them (colour augmentation keeps floats)."""
    config = ClipSamplingConfig(layout=LAYOUT, crop_size=32, sometimes_upscale_p=0.3, color_augment=color_augment,
                                uint8_video=uint8_video)
    manifest = str(rgb_corpus / "train.tsv")
    dataset = (AVOffsetDataset(manifest, config, train=True, crop_s=1.0, max_offset_s=0.4, num_offset_classes=5)
               if stage == "offset" else AVSegmentDataset(manifest, config, train=True))
    starts = segment_start_frames(LAYOUT, 0)
    index = starts[:, None] + np.arange(LAYOUT.segment_frames)
    for item_index in range(len(dataset)):
        item = dataset[item_index]
        rng = dataset.item_rng(item_index)
        window = dataset.sample_window(item_index, rng)
        frames, _ = dataset.decode(dataset.entries[item_index], window.video_start_frame, LAYOUT.span_frames,
                                   window.audio_start_sample, LAYOUT.span_samples)
        if stage == "offset":
            expected = reference_synchformer_video_transform(frames, 32, True, rng, small_crop_p=0.3)[
                torch.as_tensor(index)]
        else:
            expected = reference_synchformer_video_transform(frames[index], 32, True, rng, color_augment=color_augment,
                                                             small_crop_p=0.3)
        video = item["video"]
        assert video.dtype == (torch.uint8 if uint8_video and not color_augment else torch.float32)
        if video.dtype == torch.uint8:
            video = tr.normalized_segments(video[None], item.get("video_frame_index"))[0]
        assert video.shape == (4, 8, 3, 32, 32)
        torch.testing.assert_close(video, expected, rtol=0, atol=1e-6 if color_augment else 0)


def test_speech_items_equal_the_reference(gray_corpus):
    dataset = AVSpeechDataset(str(gray_corpus / "train.tsv"), ["audio", "video"], train=True, max_frames=32)
    for index in range(len(dataset)):
        item = dataset[index]
        rng = dataset.item_rng(index)
        entry = dataset.entries[index]
        num_frames = int(dataset.sizes[index])
        start = int(rng.integers(0, entry.num_video_frames - num_frames + 1)) if entry.num_video_frames > 32 else 0
        frames, samples = dataset.decode(index, start, num_frames)
        crop = tr.random_crop(frames, 88, rng)
        crop = tr.horizontal_flip(crop) if rng.random() < tr.FLIP_P else crop
        np.testing.assert_array_equal(item["video"].numpy(), reference_normalize_gray(crop))
        np.testing.assert_array_equal(item["audio"].numpy(), reference_av_data2vec_audio_features(samples, len(frames)))


# --- media: WAV opened from its header ----------------------------------------------------
def test_wav_opened_from_its_header_reads_like_a_fully_probed_open(tmp_path, monkeypatch):
    samples = (0.3 * np.random.default_rng(6).standard_normal(SR + 321)).astype(np.float32)
    path = tmp_path / "a.wav"
    write_audio(path, samples, SR)
    int16 = np.clip(np.round(samples * 32768.0), -32768, 32767) / 32768.0
    fast = [media.read_audio(path), media.read_audio(path, start_s=0.37, duration_s=0.5), media.probe(path)]
    np.testing.assert_array_equal(fast[0], int16.astype(np.float32))  # s16 mono fast path: exact
    with media._open_input(path) as container:
        assert container.format.name == "wav" and container.streams.audio[0].codec_context.sample_rate == SR
    monkeypatch.setattr(media, "_is_wav", lambda _: False)  # the default probing
    full = [media.read_audio(path), media.read_audio(path, start_s=0.37, duration_s=0.5), media.probe(path)]
    np.testing.assert_array_equal(fast[0], full[0])
    np.testing.assert_array_equal(fast[1], full[1])
    assert fast[2] == full[2]


def test_non_wav_files_are_not_taken_for_wav(tmp_path):
    riff_avi = tmp_path / "x.wav"
    riff_avi.write_bytes(b"RIFF\x00\x00\x00\x00AVI " + bytes(100))
    assert not media._is_wav(str(riff_avi))
    with pytest.raises(media.MediaError, match="x.wav"):
        media.read_audio(riff_avi)
