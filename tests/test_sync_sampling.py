"""Offset and segment arithmetic of Synchformer: known answers and properties."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avplugins.data import sync_sampling as ss

PAPER = ss.SegmentLayout()  # 14 x 16 frames, stride 8, 25 fps, 16 kHz


def test_paper_layout_numbers():
    assert PAPER.span_frames == 120  # 4.8 s
    assert PAPER.span_s == pytest.approx(4.8)
    assert PAPER.segment_samples == 10240 and PAPER.stride_samples == 5120
    assert PAPER.span_samples == 76800
    stage1 = ss.SegmentLayout(stride_frames=16)
    assert stage1.span_frames == 224 and stage1.span_s == pytest.approx(8.96)
    synchronizability = ss.SegmentLayout(num_segments=13)
    assert synchronizability.span_s == pytest.approx(4.48)


def test_offset_grid_known_answer():
    grid = ss.offset_grid(2.0, 21)
    assert grid[0] == -2.0 and grid[-1] == 2.0 and grid[10] == 0.0
    np.testing.assert_allclose(np.diff(grid), 0.2, atol=1e-9)
    assert ss.offset_to_class(0.0, grid) == 10
    assert ss.offset_to_class(-2.0, grid) == 0
    assert ss.offset_to_class(0.61, grid) == 13
    with pytest.raises(ValueError, match="odd"):
        ss.offset_grid(2.0, 20)


def test_segment_starts_and_first_frame():
    np.testing.assert_array_equal(ss.segment_start_frames(PAPER, 2)[:3], [2, 10, 18])
    np.testing.assert_array_equal(ss.segment_start_samples(PAPER, 0)[:3], [0, 5120, 10240])
    # test time: middle of the 5 frames of slack in a 125-frame crop -> frame 2 (official)
    assert ss.first_segment_frame(125, PAPER, train=False) == 2
    starts = {ss.first_segment_frame(125, PAPER, True, np.random.default_rng(i)) for i in range(200)}
    assert starts == {0, 1, 2, 3, 4, 5}
    with pytest.raises(ValueError, match="cannot hold"):
        ss.first_segment_frame(100, PAPER, train=False)


def test_audio_start_follows_offset_sign():
    # positive offset: audio crop starts later than the video crop ("audio is early")
    assert ss.audio_start_sample(50, 0.4, PAPER) == int((2.0 + 0.4) * 16000)
    assert ss.audio_start_sample(50, -0.4, PAPER) == int((2.0 - 0.4) * 16000)


@settings(max_examples=200, deadline=None)
@given(
    num_frames=st.integers(125, 400),
    offset_index=st.integers(0, 20),
    seed=st.integers(0, 2**31),
)
def test_sampled_crops_stay_inside_the_clip(num_frames, offset_index, seed):
    grid = ss.offset_grid()
    offset_s = float(grid[offset_index])
    crop_frames = 125
    rng = np.random.default_rng(seed)
    if num_frames < crop_frames + abs(offset_s) * 25 - 1e-6:
        with pytest.raises(ValueError, match="too short"):
            ss.sample_video_start_frame(num_frames, crop_frames, offset_s, 25, rng)
        return
    start = ss.sample_video_start_frame(num_frames, crop_frames, offset_s, 25, rng)
    assert 0 <= start and start + crop_frames <= num_frames
    audio_start = ss.audio_start_sample(start, offset_s, PAPER)
    assert 0 <= audio_start and audio_start + crop_frames * 640 <= num_frames * 640
    jittered = ss.jitter_samples(audio_start, crop_frames * 640, num_frames * 640, 0.05, 16000, rng)
    assert abs(jittered - audio_start) <= 800
    assert 0 <= jittered and jittered + crop_frames * 640 <= num_frames * 640


def test_minimum_clip_length_admits_every_offset():
    min_frames = ss.min_clip_frames_for_offsets(125, 2.0, 25)
    assert min_frames == 175
    rng = np.random.default_rng(0)
    for offset_s in ss.offset_grid():
        ss.sample_video_start_frame(min_frames, 125, float(offset_s), 25, rng)
    with pytest.raises(ValueError):
        ss.sample_video_start_frame(min_frames - 1, 125, 2.0, 25, rng)


def test_layout_validation():
    with pytest.raises(ValueError, match="num_segments"):
        ss.SegmentLayout(num_segments=0)
    with pytest.raises(ValueError, match="multiple"):
        ss.SegmentLayout(sample_rate=16001)
