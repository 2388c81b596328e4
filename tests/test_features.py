"""Audio features: AV-HuBERT log filterbanks (AV-data2vec) and AST log-mels (Synchformer).

Oracles: python_speech_features on int16 data (what AV-HuBERT runs), librosa's HTK Mel
filterbank and power Mel spectrogram (torchaudio cannot be imported here), torch's layer_norm,
and an independent float64 numpy re-computation of the whole Synchformer chain.
"""
import logging

import librosa
import numpy as np
import pytest
import python_speech_features
import torch
import torch.nn.functional as F

from avplugins.data import features as feat

# `import fairseq` (through avplugins) sets the root logger to DEBUG; numba would then log every
# compilation step of librosa's first call, which takes tens of seconds.
logging.getLogger("numba").setLevel(logging.WARNING)

SR = 16000


def _chirp(num_samples: int, f0: float = 100.0, f1: float = 7000.0) -> np.ndarray:
    t = np.arange(num_samples) / SR
    duration = num_samples / SR
    return 0.5 * np.sin(2 * np.pi * (f0 * t + 0.5 * (f1 - f0) / duration * t**2))


def _signals():
    rng = np.random.default_rng(0)
    return {
        "noise": 0.1 * rng.standard_normal(feat.SEGMENT_SAMPLES),
        "chirp": _chirp(feat.SEGMENT_SAMPLES),
        "chirp_plus_noise": _chirp(feat.SEGMENT_SAMPLES, 300, 5000)
        + 0.01 * rng.standard_normal(feat.SEGMENT_SAMPLES),
    }


def _librosa_mel_power(y: np.ndarray) -> np.ndarray:
    return librosa.feature.melspectrogram(
        y=y, sr=SR, n_fft=1024, win_length=400, hop_length=160, n_mels=128, power=2.0,
        center=True, pad_mode="reflect", htk=True, norm=None,
    )


# --- Synchformer: Mel filterbank and spectrogram -------------------------------------------
def test_mel_filterbank_matches_librosa_htk_without_norm():
    ours = feat.htk_mel_filterbank(513, 128, SR)
    reference = librosa.filters.mel(sr=SR, n_fft=1024, n_mels=128, htk=True, norm=None, dtype=np.float64)
    assert ours.shape == (128, 513)
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(feat.LogMelSpectrogram().mel_filterbank.numpy(), ours)


def test_window_is_periodic_hann_of_400_centred_in_1024():
    window = feat.centered_hann_window(400, 1024).numpy()
    n = np.arange(400)
    np.testing.assert_allclose(window[312:712], 0.5 - 0.5 * np.cos(2 * np.pi * n / 400), atol=1e-15)
    assert not window[:312].any() and not window[712:].any()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ["noise", "chirp", "chirp_plus_noise"])
def test_mel_power_matches_librosa(name, dtype):
    """Frobenius relative error < 1e-4: float32 FFT rounding is relative to the whole frame's
    energy, so entries many orders below the peak (the chirp's far bins, down to 1e-13) carry
    absolute, not relative, errors; a matrix norm measures what matters. Entries above 1e-6 of
    the peak must also agree elementwise to 1e-3, which catches any localised bin/frame error."""
    y = _signals()[name]
    reference = _librosa_mel_power(y)
    ours = feat.LogMelSpectrogram().mel_power(torch.tensor(y, dtype=dtype)).double().numpy()
    assert ours.shape == reference.shape == (128, 65)
    assert np.linalg.norm(ours - reference) / np.linalg.norm(reference) < 1e-4
    significant = reference > 1e-6 * reference.max()
    assert np.max(np.abs(ours - reference)[significant] / reference[significant]) < 1e-3


@pytest.mark.parametrize("num_samples", [10240, 5000, 513])
def test_log_mel_frame_count(num_samples):
    out = feat.LogMelSpectrogram()(torch.zeros(num_samples))
    assert out.shape == (128, num_samples // 160 + 1)
    # Silence: log of the offset.
    torch.testing.assert_close(out, torch.full_like(out, np.log(1e-6)))


def test_log_mel_rejects_audio_too_short_for_reflect_padding():
    with pytest.raises(ValueError, match="512 samples is too short"):
        feat.LogMelSpectrogram()(torch.zeros(2, 512))


def test_log_mel_is_batched_keeps_dtype_and_has_no_state():
    rng = np.random.default_rng(1)
    batch = torch.tensor(0.1 * rng.standard_normal((2, 3, 10240)), dtype=torch.float64)
    module = feat.LogMelSpectrogram()
    out = module(batch)
    assert out.shape == (2, 3, 128, 65) and out.dtype == torch.float64
    torch.testing.assert_close(out[1, 2], module(batch[1, 2]), rtol=0, atol=1e-12)
    assert module.state_dict() == {}  # derived buffers stay out of checkpoints


def test_log_mel_gradients_match_finite_differences():
    module = feat.LogMelSpectrogram(n_fft=32, win_length=20, hop_length=8, n_mels=6)
    samples = torch.randn(2, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.autograd.gradcheck(module, (samples.requires_grad_(),))


def test_pad_or_trim_time():
    spec = torch.arange(2 * 70, dtype=torch.float32).reshape(2, 70)
    torch.testing.assert_close(feat.pad_or_trim_time(spec), spec[:, :66])
    padded = feat.pad_or_trim_time(spec[:, :60])
    assert padded.shape == (2, 66)
    torch.testing.assert_close(padded[:, :60], spec[:, :60])
    assert not padded[:, 60:].any()


def test_synchformer_normalize_known_answer():
    x = torch.tensor([-4.2677393, -4.2677393 + 2 * 4.5689974], dtype=torch.float64)
    expected = torch.tensor([0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(feat.synchformer_normalize(x), expected)


def test_synchformer_audio_features_shape_and_padding_column():
    segments = 0.1 * torch.randn(2, 14, 10240, generator=torch.Generator().manual_seed(0))
    out = feat.synchformer_audio_features(segments)
    assert out.shape == (2, 14, 1, 128, 66) and out.dtype == torch.float32
    # Official order mel -> log -> pad -> normalise: the padded column is the normalised 0,
    # i.e. 4.2677393 / (2 * 4.5689974) = 0.4670, not 0.
    pad_value = 4.2677393 / (2 * 4.5689974)
    assert torch.all(out[..., 65] == out[0, 0, 0, 0, 65])
    assert abs(out[0, 0, 0, 0, 65].item() - pad_value) < 1e-7
    expected = feat.synchformer_normalize(feat.LogMelSpectrogram()(segments)).unsqueeze(-3)
    torch.testing.assert_close(out[..., :65], expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
@pytest.mark.parametrize("name", ["noise", "chirp_plus_noise"])
def test_synchformer_chain_matches_float64_recomputation(name, dtype, atol):
    """Torch chain vs librosa power (float64) -> log -> zero column -> normalise in numpy.

    In float32 the quietest Mel bins (1e-5 of the peak) keep ~1e-3 relative FFT rounding error,
    i.e. ~1e-4 after the log and the division by 2 * 4.57; float64 input is exact to rounding."""
    y = _signals()[name]
    log_mel = np.log(_librosa_mel_power(y) + 1e-6)
    padded = np.concatenate([log_mel, np.zeros((128, 1))], axis=1)
    reference = (padded - (-4.2677393)) / (2 * 4.5689974)
    ours = feat.synchformer_audio_features(torch.tensor(y, dtype=dtype))
    assert ours.shape == (1, 128, 66) and ours.dtype == dtype
    np.testing.assert_allclose(ours[0].double().numpy(), reference, rtol=0, atol=atol)


# --- AV-data2vec: AV-HuBERT log filterbanks ------------------------------------------------
def test_stack_frames_known_answer():
    features = np.arange(6 * 2, dtype=np.float32).reshape(6, 2)  # frame t = [2t, 2t + 1]
    stacked = feat.stack_frames(features, stack_order=4)
    expected = np.array([[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 0, 0, 0, 0]], dtype=np.float32)
    np.testing.assert_array_equal(stacked, expected)
    assert stacked.dtype == np.float32
    assert feat.stack_frames(features[:4]).shape == (1, 8)  # no padding when divisible


@pytest.mark.parametrize(
    "num_samples, num_frames",
    # python_speech_features: 1 frame if N <= 400, else 1 + ceil((N - 400) / 160) (last frame
    # zero-padded), so one second gives 99 frames, not 100.
    [(16000, 99), (16080, 99), (16081, 100), (400, 1), (401, 2)],
)
def test_logfbank_frame_count(num_samples, num_frames):
    samples = 0.1 * np.random.default_rng(0).standard_normal(num_samples)
    out = feat.logfbank_features(samples)
    assert out.shape == (num_frames, 26) and out.dtype == np.float32


def test_logfbank_float_input_equals_logfbank_of_int16_data():
    int16 = np.random.default_rng(2).integers(-20000, 20000, size=8000).astype(np.int16)
    reference = python_speech_features.logfbank(int16, samplerate=SR).astype(np.float32)
    np.testing.assert_array_equal(feat.logfbank_features(int16 / 32768.0), reference)
    # The scale matters: int16-range samples have 2 ln(32768) more log energy than [-1, 1] ones.
    unscaled = python_speech_features.logfbank(int16 / 32768.0, samplerate=SR)
    np.testing.assert_allclose(reference - unscaled, 2 * np.log(32768.0), atol=1e-4)


def test_logfbank_of_440_hz_sine_peaks_in_nearest_filter():
    t = np.arange(SR) / SR
    energies = feat.logfbank_features(0.5 * np.sin(2 * np.pi * 440 * t)).mean(axis=0)
    # 26 triangular filters centred at points equally spaced on the HTK Mel scale over 0..8 kHz.
    mel_max = 2595 * np.log10(1 + 8000 / 700)
    centres_hz = 700 * (10 ** (np.linspace(0, mel_max, 28)[1:-1] / 2595) - 1)
    assert np.argmax(energies) == np.argmin(np.abs(centres_hz - 440)) == 4


def test_align_to_video_pads_with_zeros_and_trims():
    features = np.arange(3 * 2, dtype=np.float32).reshape(3, 2) + 1
    padded = feat.align_to_video(features, 5)
    np.testing.assert_array_equal(padded, np.concatenate([features, np.zeros((2, 2), np.float32)]))
    np.testing.assert_array_equal(feat.align_to_video(features, 2), features[:2])
    np.testing.assert_array_equal(feat.align_to_video(features, 3), features)


def test_normalize_frames_is_av_hubert_layer_norm_per_frame():
    features = np.random.default_rng(3).normal(5.0, 3.0, size=(7, 104)).astype(np.float32)
    features[-1] = 0.0  # a padding frame
    ours = feat.normalize_frames(features)
    torch_ref = F.layer_norm(torch.from_numpy(features), features.shape[1:]).numpy()
    np.testing.assert_allclose(ours, torch_ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours[:-1].mean(axis=1), 0.0, atol=1e-5)
    np.testing.assert_allclose(ours[:-1].std(axis=1), 1.0, atol=1e-3)
    assert not ours[-1].any()


def test_av_data2vec_audio_features_pipeline():
    samples = 0.3 * np.random.default_rng(4).standard_normal(SR)  # 1 s: 99 frames -> 25 rows
    out = feat.av_data2vec_audio_features(samples, num_video_frames=27)
    assert out.shape == (27, 104) and out.dtype == np.float32
    expected_rows = feat.normalize_frames(feat.stack_frames(feat.logfbank_features(samples)))
    np.testing.assert_array_equal(out[:25], expected_rows)
    assert not out[25:].any()  # video longer than audio: zero frames stay zero after the norm
    np.testing.assert_array_equal(feat.av_data2vec_audio_features(samples, 20), expected_rows[:20])


def test_logfbank_rejects_multichannel_and_empty_audio():
    with pytest.raises(ValueError, match=r"mono with shape \(N,\), got shape \(2, 100\)"):
        feat.logfbank_features(np.zeros((2, 100)))
    with pytest.raises(ValueError, match="audio has no samples"):
        feat.logfbank_features(np.zeros(0, np.float32))


@pytest.mark.parametrize(
    "num_samples, starts, segment_samples",
    [
        (48000, list(range(0, 48000 - 10240 + 1, 640)), 10240),  # every 25 fps frame (feature cache)
        (40000, [0, 5120, 10240, 29760], 10240),  # 50 % overlap (stage 2, avsync predict), clip end
        (30000, [0, 3200, 16000], 10240),
        (30000, [0, 100, 7000], 10240),  # off the hop grid: per-segment fallback
        (6000, [0, 160, 800], 1600),  # short segments: few shared frames
        (6000, [0, 160, 800], 1100),  # too short to share frames: fallback
    ],
)
def test_segment_features_sharing_frames_equal_per_segment(num_samples, starts, segment_samples):
    samples = torch.from_numpy(np.random.default_rng(3).standard_normal(num_samples).astype(np.float32) * 0.1)
    starts = torch.tensor(starts)
    per_segment = feat.synchformer_audio_features(samples[starts[:, None] + torch.arange(segment_samples)])
    shared = feat.synchformer_audio_features_at(samples, starts, segment_samples)
    assert shared.shape == per_segment.shape
    torch.testing.assert_close(shared, per_segment, rtol=1e-6, atol=1e-5)
