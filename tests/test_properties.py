"""Property-based tests (hypothesis) of shapes and masking invariants that hold for any size."""
import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from avplugins.data.features import (
    align_to_video,
    av_data2vec_audio_features,
    logfbank_features,
    stack_frames,
    synchformer_audio_features,
)
from avplugins.modules.span_mask import compute_span_mask

FAST = settings(max_examples=40, deadline=None)


@FAST
@given(num_samples=st.integers(401, 16000 * 3), num_video_frames=st.integers(1, 90))
def test_av_data2vec_features_always_match_the_video_length(num_samples, num_video_frames):
    samples = np.random.default_rng(num_samples).uniform(-0.5, 0.5, num_samples).astype(np.float32)
    features = av_data2vec_audio_features(samples, num_video_frames)
    assert features.shape == (num_video_frames, 104)
    assert features.dtype == np.float32 and np.isfinite(features).all()
    # the 100 Hz frames python_speech_features makes, stacked by 4
    expected_rows = -(-(1 + -(-(num_samples - 400) // 160)) // 4)
    assert stack_frames(logfbank_features(samples)).shape == (expected_rows, 104)


@FAST
@given(num_frames=st.integers(0, 50), num_features=st.integers(1, 8), stack_order=st.integers(1, 6))
def test_stacking_keeps_every_frame_in_order(num_frames, num_features, stack_order):
    features = np.arange(num_frames * num_features, dtype=np.float32).reshape(num_frames, num_features)
    stacked = stack_frames(features, stack_order)
    assert stacked.shape == (-(-num_frames // stack_order), stack_order * num_features)
    np.testing.assert_array_equal(stacked.reshape(-1, num_features)[:num_frames], features)
    assert not stacked.reshape(-1, num_features)[num_frames:].any()


@FAST
@given(num_frames=st.integers(0, 40), target=st.integers(0, 40))
def test_align_to_video_pads_or_trims_at_the_end(num_frames, target):
    features = np.ones((num_frames, 3), np.float32)
    aligned = align_to_video(features, target)
    assert aligned.shape == (target, 3)
    assert aligned.sum() == 3 * min(num_frames, target)


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 3), segments=st.integers(1, 4))
def test_synchformer_features_shape_for_any_batch(batch, segments):
    waveform = torch.randn(batch, segments, 10240, generator=torch.Generator().manual_seed(batch * 7 + segments))
    features = synchformer_audio_features(waveform)
    assert features.shape == (batch, segments, 1, 128, 66)
    assert torch.isfinite(features).all()


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 120), min_size=1, max_size=5),
    mask_prob=st.floats(0.0, 0.9),
    span_length=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
)
def test_span_masks_respect_padding_spans_and_never_cover_everything(lengths, mask_prob, span_length, seed):
    num_steps = max(lengths) + 3
    padding_mask = torch.arange(num_steps)[None, :] >= torch.tensor(lengths)[:, None]
    mask = compute_span_mask(
        len(lengths), num_steps, mask_prob=mask_prob, span_length=span_length,
        padding_mask=padding_mask, generator=torch.Generator().manual_seed(seed),
    )
    assert mask.shape == (len(lengths), num_steps) and mask.dtype == torch.bool
    assert not (mask & padding_mask).any(), "padding must never be masked"
    for row, length in enumerate(lengths):
        masked = mask[row, :length]
        if length > 0:
            assert not masked.all(), "a sequence is never masked completely"
        # every run of masked steps is made of whole spans
        runs, current = [], 0
        for value in masked.tolist() + [False]:
            if value:
                current += 1
            elif current:
                runs.append(current)
                current = 0
        assert all(run >= span_length for run in runs)
