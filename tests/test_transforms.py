"""Video transforms: known-answer crops on index images, flips, normalisation constants,
colour operations against colorsys, and the statistics of the random training transforms."""
import colorsys

import numpy as np
import pytest
import torch

from avplugins.data import transforms as tr


def _index_frames(num_frames: int, height: int, width: int) -> np.ndarray:
    """int64 (T, H, W) with pixel value ``1000 t + W h + w``: every value names its position."""
    t, h, w = np.meshgrid(np.arange(num_frames), np.arange(height), np.arange(width), indexing="ij")
    return 1000 * t + width * h + w


def _column_ramp_rgb(num_frames: int, height: int, width: int, step: int = 2) -> np.ndarray:
    """uint8 (T, H, W, 3) whose value is ``step * column`` in every channel."""
    ramp = (step * np.arange(width)).astype(np.uint8)
    return np.broadcast_to(ramp[None, None, :, None], (num_frames, height, width, 3)).copy()


# --- crops and flips -----------------------------------------------------------------------
def test_center_crop_known_answer_numpy_and_torch():
    frames = _index_frames(2, 6, 7)
    expected = frames[:, 1:5, 1:5]  # offsets (6 - 4) // 2 = 1 and (7 - 4) // 2 = 1
    np.testing.assert_array_equal(tr.center_crop(frames, 4), expected)
    np.testing.assert_array_equal(tr.center_crop(torch.from_numpy(frames), 4).numpy(), expected)
    mouth = _index_frames(1, 96, 96)
    np.testing.assert_array_equal(tr.center_crop(mouth, 88), mouth[:, 4:92, 4:92])


def test_random_crop_is_the_same_window_for_all_frames_and_covers_all_positions():
    frames = _index_frames(3, 6, 6)
    seen = set()
    for seed in range(100):
        out = tr.random_crop(frames, 5, np.random.default_rng(seed))
        top, left = divmod(int(out[0, 0, 0]), 6)
        np.testing.assert_array_equal(out, frames[:, top : top + 5, left : left + 5])
        seen.add((top, left))
    assert seen == {(0, 0), (0, 1), (1, 0), (1, 1)}


def test_horizontal_flip_known_answer_and_twice_is_identity():
    frames = _index_frames(2, 3, 4)
    flipped = tr.horizontal_flip(frames)
    np.testing.assert_array_equal(flipped[1, 2], frames[1, 2, ::-1])
    np.testing.assert_array_equal(tr.horizontal_flip(flipped), frames)
    video = torch.from_numpy(frames)
    torch.testing.assert_close(tr.horizontal_flip(tr.horizontal_flip(video)), video)
    np.testing.assert_array_equal(tr.horizontal_flip(video).numpy(), flipped)


@pytest.mark.parametrize(
    "crop", [tr.center_crop, lambda frames, size: tr.random_crop(frames, size, np.random.default_rng(0))]
)
def test_crop_larger_than_frames_names_the_sizes(crop):
    with pytest.raises(ValueError, match=r"frames of 80x90 \(HxW\) are smaller than the 88x88 crop"):
        crop(np.zeros((2, 80, 90), np.uint8), 88)


# --- AV-data2vec ---------------------------------------------------------------------------
def test_normalize_gray_constants():
    out = tr.normalize_gray(np.array([0, 255, 107], dtype=np.uint8))
    assert out.dtype == np.float32
    expected = np.array([-0.421 / 0.165, (1 - 0.421) / 0.165, (107 / 255 - 0.421) / 0.165], np.float32)
    np.testing.assert_array_equal(out, expected)


def test_av_data2vec_eval_is_a_deterministic_centre_crop():
    frames = np.random.default_rng(0).integers(0, 256, (5, 96, 96), dtype=np.uint8)
    out = tr.av_data2vec_video_transform(frames, train=False)
    assert out.shape == (5, 88, 88) and out.dtype == np.float32
    np.testing.assert_array_equal(out, tr.normalize_gray(frames[:, 4:92, 4:92]))
    np.testing.assert_array_equal(out, tr.av_data2vec_video_transform(frames, train=False))


def test_av_data2vec_train_crop_and_flip_statistics():
    frames = np.broadcast_to(np.arange(96, dtype=np.uint8), (4, 96, 96)).copy()  # value = column
    num_flipped, lefts = 0, set()
    for seed in range(400):
        out = tr.av_data2vec_video_transform(frames, train=True, rng=np.random.default_rng(seed))
        assert out.shape == (4, 88, 88) and out.dtype == np.float32
        columns = np.rint((out[0, 0] * 0.165 + 0.421) * 255).astype(int)
        flipped = columns[0] > columns[-1]
        # The same crop and flip for all frames.
        np.testing.assert_array_equal(out, out[:1].repeat(4, axis=0))
        lefts.add(int(columns.min()))
        assert list(columns) == list(range(columns.min(), columns.min() + 88))[:: -1 if flipped else 1]
        num_flipped += flipped
    assert 0.4 < num_flipped / 400 < 0.6  # p 0.5, binomial std 0.025
    assert lefts == set(range(9))  # every horizontal offset 0..8 is drawn


def test_av_data2vec_transform_errors():
    with pytest.raises(ValueError, match=r"uint8 grayscale \(T, H, W\), got float64 \(2, 96, 96, 3\)"):
        tr.av_data2vec_video_transform(np.zeros((2, 96, 96, 3)), train=False)
    with pytest.raises(ValueError, match="80x80"):
        tr.av_data2vec_video_transform(np.zeros((2, 80, 80), np.uint8), train=False)
    with pytest.raises(TypeError, match="np.random.Generator"):
        tr.av_data2vec_video_transform(np.zeros((2, 96, 96), np.uint8), train=True)


# --- resizing -------------------------------------------------------------------------------
def test_resize_short_side_shapes_and_dtypes():
    landscape = torch.zeros(2, 3, 40, 60, dtype=torch.uint8)
    out = tr.resize_short_side(landscape, 20)
    assert out.shape == (2, 3, 20, 30) and out.dtype == torch.uint8
    assert tr.resize_short_side(torch.zeros(3, 50, 30), 24).shape == (3, 40, 24)  # int(24 * 50 / 30)
    constant = torch.full((1, 3, 40, 60), 77, dtype=torch.uint8)
    assert torch.all(tr.resize_short_side(constant, 13) == 77)


def test_resize_downscale_is_antialiased():
    """Thirding a 1-pixel checkerboard: plain bilinear samples single pixels (0 or 1); the
    antialiased filter averages 3-pixel neighbourhoods to 4/9 or 5/9."""
    checker = ((torch.arange(30)[:, None] + torch.arange(30)[None, :]) % 2).float().expand(3, 30, 30)
    out = tr.resize(checker, 10, 10, mode="bilinear")
    interior = out[..., 1:-1, 1:-1]
    assert torch.all((interior - 0.5).abs() < 0.06)
    aliased = torch.nn.functional.interpolate(
        checker[None], size=(10, 10), mode="bilinear", antialias=False
    )
    assert torch.all((aliased[..., 1:-1, 1:-1] - 0.5).abs() > 0.49)


# --- colour ---------------------------------------------------------------------------------
def _random_rgb(*shape) -> torch.Tensor:
    return torch.rand(*shape, 3, 5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_rgb_hsv_round_trip_matches_colorsys():
    video = _random_rgb(2)
    hsv = tr.rgb_to_hsv(video)
    pixels = video.movedim(-3, -1).reshape(-1, 3).tolist()
    expected = torch.tensor([colorsys.rgb_to_hsv(*p) for p in pixels], dtype=torch.float64)
    torch.testing.assert_close(hsv.movedim(-3, -1).reshape(-1, 3), expected)
    torch.testing.assert_close(tr.hsv_to_rgb(hsv), video)
    gray_and_black = torch.tensor([0.5, 0.5, 0.5, 0.0, 0.0, 0.0], dtype=torch.float64).view(2, 3, 1, 1)
    hue_and_saturation = tr.rgb_to_hsv(gray_and_black)[:, :2]
    torch.testing.assert_close(hue_and_saturation, torch.zeros_like(hue_and_saturation))


def test_adjust_hue_matches_colorsys_rotation():
    video = _random_rgb(1)
    shifted = tr.adjust_hue(video, 0.3)
    pixels = video.movedim(-3, -1).reshape(-1, 3).tolist()
    expected = []
    for pixel in pixels:
        hue, saturation, value = colorsys.rgb_to_hsv(*pixel)
        expected.append(colorsys.hsv_to_rgb((hue + 0.3) % 1.0, saturation, value))
    expected = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(shifted.movedim(-3, -1).reshape(-1, 3), expected)
    torch.testing.assert_close(tr.adjust_hue(video, 0.0), video)


def test_brightness_contrast_saturation_known_answers():
    video = torch.tensor([0.3, 0.7, 0.2], dtype=torch.float64).view(3, 1, 1).expand(3, 2, 2)
    brighter = tr.adjust_brightness(video, 2.0)[:, 0, 0]
    torch.testing.assert_close(brighter, torch.tensor([0.6, 1.0, 0.4], dtype=torch.float64))
    luma = 0.2989 * 0.3 + 0.587 * 0.7 + 0.114 * 0.2
    torch.testing.assert_close(tr.adjust_saturation(video, 0.0), torch.full_like(video, luma))
    torch.testing.assert_close(tr.adjust_saturation(video, 1.0), video)
    torch.testing.assert_close(tr.grayscale(video), torch.full_like(video, luma))
    # Contrast blends with the mean luma of each frame separately.
    two_frames = torch.stack([video, video / 2])
    low_contrast = tr.adjust_contrast(two_frames, 0.0)
    torch.testing.assert_close(low_contrast[0], torch.full_like(video, luma))
    torch.testing.assert_close(low_contrast[1], torch.full_like(video, luma / 2))


def test_color_jitter_strength_zero_is_identity_and_output_stays_in_range():
    video = _random_rgb(4).float()
    torch.testing.assert_close(tr.color_jitter(video, np.random.default_rng(0), strength=0.0), video)
    for seed in range(20):
        out = tr.color_jitter(video, np.random.default_rng(seed))
        assert out.shape == video.shape and 0.0 <= out.min() and out.max() <= 1.0
    changed = tr.color_jitter(video, np.random.default_rng(1))
    assert (changed - video).abs().max() > 0.05
    torch.testing.assert_close(changed, tr.color_jitter(video, np.random.default_rng(1)))


# --- Synchformer ----------------------------------------------------------------------------
def test_synchformer_eval_is_a_deterministic_normalised_centre_crop():
    frames = np.random.default_rng(0).integers(0, 256, (4, 40, 48, 3), dtype=np.uint8)
    out = tr.synchformer_video_transform(frames, crop_size=32)
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32
    crop = torch.from_numpy(frames[:, 4:36, 8:40]).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(out, (crop / 255 - 0.5) / 0.5, rtol=0, atol=1e-7)
    from_tensor = tr.synchformer_video_transform(torch.from_numpy(frames), crop_size=32)
    torch.testing.assert_close(out, from_tensor, rtol=0, atol=0)
    assert out.min() >= -1 and out.max() <= 1


def test_synchformer_default_crop_and_short_side_resize():
    frames = np.zeros((2, 256, 340, 3), dtype=np.uint8)
    assert tr.synchformer_video_transform(frames).shape == (2, 3, 224, 224)
    small = frames[:, :200, :300]
    assert tr.synchformer_video_transform(small, short_side=256).shape == (2, 3, 224, 224)


def _column_of(out: torch.Tensor) -> torch.Tensor:
    """Undo the normalisation of a ramp image: (..., 3, h, w) -> (..., w) columns (step 2)."""
    return torch.round((out[..., 0, 0, :] * 0.5 + 0.5) * 255 / 2).long()


def test_synchformer_train_shared_crop_and_per_segment_flips():
    frames = _column_ramp_rgb(4, 40, 48).reshape(2, 2, 40, 48, 3)  # (S=2, T=2, H, W, 3)
    flip_counts, differing = [], 0
    for seed in range(300):
        rng = np.random.default_rng(seed)
        out = tr.synchformer_video_transform(frames, crop_size=32, train=True, rng=rng)
        assert out.shape == (2, 2, 3, 32, 32) and out.dtype == torch.float32
        columns = _column_of(out)  # (S, T, 32)
        flipped = columns[..., 0] > columns[..., -1]  # (S, T)
        assert torch.all(flipped == flipped[:, :1])  # one flip per segment, all its frames
        assert torch.all(columns.sort(dim=-1).values == columns.sort(dim=-1).values[0, 0])  # shared crop
        flip_counts.append(flipped[:, 0])
        differing += bool(flipped[0, 0] != flipped[1, 0])
    assert 0.42 < torch.stack(flip_counts).float().mean() < 0.58  # p 0.5 over 600 segments
    assert 0.4 < differing / 300 < 0.6  # segments flip independently


def test_synchformer_small_crop_upscale_probability_and_span():
    """On a ramp image (value 2 * column) a 32 crop spans 31 columns; the smaller crop of
    round(32 * 192 / 224) = 27 columns upscaled to 32 spans 26 (bilinear, edges clamped)."""
    frames = _column_ramp_rgb(2, 40, 48)
    rng = np.random.default_rng(0)
    always_small = _column_of(tr.synchformer_video_transform(frames, 32, True, rng, small_crop_p=1.0))
    assert always_small.max() - always_small.min() == 26
    spans = []
    for seed in range(300):
        out = tr.synchformer_video_transform(
            frames, 32, train=True, rng=np.random.default_rng(seed), small_crop_p=tr.STAGE1_SMALL_CROP_P
        )
        assert out.shape == (2, 3, 32, 32)
        columns = _column_of(out)[0]
        spans.append(int(columns.max() - columns.min()))
    assert set(spans) == {26, 31}
    assert 0.13 < spans.count(26) / 300 < 0.27  # p 0.2, binomial std 0.023


def test_synchformer_color_augment_grayscale_probability():
    frames = np.random.default_rng(0).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    plain = tr.synchformer_video_transform(frames, 32, train=True, rng=np.random.default_rng(0))
    assert not torch.all(plain[:, 0] == plain[:, 1])
    num_gray = 0
    for seed in range(300):
        rng = np.random.default_rng(seed)
        out = tr.synchformer_video_transform(frames, 32, train=True, rng=rng, color_augment=True)
        assert out.shape == (2, 3, 32, 32) and -1 <= out.min() and out.max() <= 1
        num_gray += bool(torch.all(out[:, 0] == out[:, 1]) and torch.all(out[:, 1] == out[:, 2]))
    assert 0.13 < num_gray / 300 < 0.27  # grayscale p 0.2


def test_synchformer_transform_errors():
    with pytest.raises(ValueError, match=r"frames of 20x30 \(HxW\) are smaller than the 32x32 crop"):
        tr.synchformer_video_transform(np.zeros((2, 20, 30, 3), np.uint8), crop_size=32)
    with pytest.raises(ValueError, match=r"RGB uint8 frames .* got torch.float32 \(2, 40, 40, 3\)"):
        tr.synchformer_video_transform(torch.zeros(2, 40, 40, 3), crop_size=32)
    with pytest.raises(TypeError, match="np.random.Generator"):
        tr.synchformer_video_transform(np.zeros((2, 40, 40, 3), np.uint8), crop_size=32, train=True)
