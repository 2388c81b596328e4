"""Audio features of the two systems.

AV-data2vec (AV-HuBERT inputs, numpy): 26 log Mel filterbank energies at 100 Hz from
``python_speech_features.logfbank``, four consecutive frames stacked to 104 dims at the 25 Hz
video rate, padded/trimmed to the video length, layer-normalised per frame.

Synchformer (AST inputs, torch, batched, differentiable, any device): a 128-bin power Mel
spectrogram equal to ``torchaudio.transforms.MelSpectrogram`` with the official settings
(torchaudio cannot be imported beside our torch, so it is re-implemented here and tested
against librosa), then ``log(x + 1e-6)``, zero-padded from 65 to 66 frames and normalised with
the AudioSet statistics of AST. Order as in the official transform sequence
(``AudioMelSpectrogram -> AudioLog -> PadOrTruncate -> AudioNormalizeAST``).
"""
import functools
import math
from typing import Optional, Tuple

import numpy as np
import python_speech_features
import torch
import torch.nn.functional as F
from torch import nn

# --- AV-data2vec / AV-HuBERT ---------------------------------------------------------------
AV_HUBERT_SAMPLE_RATE = 16000
INT16_SCALE = 32768.0  # float samples in [-1, 1] -> the int16 values AV-HuBERT reads from wav
AUDIO_STACK_ORDER = 4  # 100 Hz filterbank frames per 25 Hz video frame
FEATURE_LAYER_NORM_EPS = 1e-5  # torch.nn.functional.layer_norm's default
# python_speech_features.logfbank's defaults, which AV-HuBERT uses
LOGFBANK_FRAME_S = 0.025
LOGFBANK_HOP_S = 0.010
LOGFBANK_N_FFT = 512
LOGFBANK_NUM_FILTERS = 26
LOGFBANK_PREEMPHASIS = 0.97

# --- Synchformer / AST ---------------------------------------------------------------------
SYNCHFORMER_SAMPLE_RATE = 16000
SEGMENT_SAMPLES = 10240  # 0.64 s: one 16-frame segment at 25 fps
N_FFT = 1024
WIN_LENGTH = 400  # 25 ms
HOP_LENGTH = 160  # 10 ms
N_MELS = 128
LOG_OFFSET = 1e-6
AST_NUM_FRAMES = 66  # AST's max_spec_t: 65 STFT frames of a segment + 1 zero column
AST_MEAN = -4.2677393  # AST's AudioSet log-mel statistics
AST_STD = 4.5689974


def _check_mono(samples: np.ndarray) -> np.ndarray:
    samples = np.asarray(samples)
    if samples.ndim != 1:
        raise ValueError(
            f"audio samples must be mono with shape (N,), got shape {samples.shape}: "
            "average the channels first"
        )
    return samples


def logfbank_features(samples: np.ndarray, sample_rate: int = AV_HUBERT_SAMPLE_RATE) -> np.ndarray:
    """AV-HuBERT's log Mel filterbank energies.

    Args:
        samples: (N,) mono float samples in [-1, 1] (e.g. decoded int16 / 32768).
        sample_rate: samples per second (AV-HuBERT uses 16000 only).

    Returns:
        (T, 26) float32 at 100 frames per second: python_speech_features' defaults (25 ms frames,
        10 ms hop, 512-point FFT, 26 filters over 0 .. sample_rate / 2, pre-emphasis 0.97, no
        window); ``T = 1 + ceil((N - 400) / 160)`` for N > 400 at 16 kHz (99 for 1 s), else 1.

    The samples are scaled to the int16 range first because AV-HuBERT feeds the int16 values of
    ``scipy.io.wavfile.read`` to ``logfbank`` and the log energies depend on the scale.
    The library's steps (pre-emphasis, zero-padded framing, power spectrum, filterbank, log of
    the energies with 0 replaced by eps) are done here with a strided view of the frames and a
    filterbank built once per rate, instead of its index arrays and per-call filter loops.
    """
    samples = _check_mono(samples).astype(np.float64) * INT16_SCALE
    if len(samples) == 0:
        raise ValueError("audio has no samples: logfbank needs at least one; skip empty utterances")
    frame_length = _round_half_up(LOGFBANK_FRAME_S * sample_rate)
    hop_length = _round_half_up(LOGFBANK_HOP_S * sample_rate)
    emphasized = np.empty_like(samples)
    emphasized[0] = samples[0]
    np.subtract(samples[1:], LOGFBANK_PREEMPHASIS * samples[:-1], out=emphasized[1:])
    num_frames = 1 + max(0, -(-(len(samples) - frame_length) // hop_length))
    padded = np.zeros((num_frames - 1) * hop_length + frame_length)
    padded[: len(samples)] = emphasized
    frames = np.lib.stride_tricks.sliding_window_view(padded, frame_length)[::hop_length]
    # |X|^2 / n_fft as python_speech_features computes it (abs, then square), so that the
    # energies are bit-equal to the library's
    power = np.square(np.abs(np.fft.rfft(frames, LOGFBANK_N_FFT))) / LOGFBANK_N_FFT
    energies = power @ _logfbank_filters(sample_rate).T
    energies[energies == 0] = np.finfo(np.float64).eps
    return np.log(energies).astype(np.float32)


def _round_half_up(value: float) -> int:
    """The library's rounding of frame lengths (samples), e.g. 1102.5 -> 1103."""
    return int(math.floor(value + 0.5))


@functools.lru_cache(maxsize=None)
def _logfbank_filters(sample_rate: int) -> np.ndarray:
    """(26, 257) python_speech_features' triangular Mel filters over 0 .. sample_rate / 2."""
    filters = python_speech_features.get_filterbanks(
        LOGFBANK_NUM_FILTERS, LOGFBANK_N_FFT, sample_rate, 0, sample_rate / 2
    )
    filters.setflags(write=False)
    return filters


def stack_frames(features: np.ndarray, stack_order: int = AUDIO_STACK_ORDER) -> np.ndarray:
    """Concatenate groups of ``stack_order`` consecutive frames (100 Hz -> 25 Hz).

    Args:
        features: (T, F) frames.
        stack_order: frames per output row.

    Returns:
        (ceil(T / stack_order), stack_order * F): T is zero-padded to a multiple of the stack
        order; row k holds frames ``k * stack_order ... k * stack_order + stack_order - 1`` in
        time order, each F wide.
    """
    num_frames, num_features = features.shape
    padding = -num_frames % stack_order
    padded = np.concatenate([features, np.zeros((padding, num_features), features.dtype)])
    return padded.reshape(-1, stack_order * num_features)


def align_to_video(features: np.ndarray, num_video_frames: int) -> np.ndarray:
    """Zero-pad or trim (Ta, F) audio frames at the end to (num_video_frames, F)."""
    num_frames, num_features = features.shape
    if num_frames >= num_video_frames:
        return features[:num_video_frames]
    padding = np.zeros((num_video_frames - num_frames, num_features), features.dtype)
    return np.concatenate([features, padding])


def normalize_frames(features: np.ndarray) -> np.ndarray:
    """Layer norm of every frame over its features, without affine parameters.

    Args:
        features: (T, F).

    Returns:
        (T, F) float32; each row has mean 0 and variance 1 (biased, eps 1e-5). This is
        AV-HuBERT's ``F.layer_norm(feats, feats.shape[1:])`` on (T, F) features, i.e. per
        frame over F, not over the whole utterance; all-zero padding rows stay zero.
    """
    features = np.asarray(features, dtype=np.float32)
    mean = features.mean(axis=1, keepdims=True)
    var = features.var(axis=1, keepdims=True)
    return ((features - mean) / np.sqrt(var + FEATURE_LAYER_NORM_EPS)).astype(np.float32)


def av_data2vec_audio_features(
    samples: np.ndarray, num_video_frames: int, sample_rate: int = AV_HUBERT_SAMPLE_RATE
) -> np.ndarray:
    """AV-data2vec / AV-HuBERT audio input of one utterance.

    Args:
        samples: (N,) mono float samples in [-1, 1].
        num_video_frames: length of the 25 fps video the features must align with.
        sample_rate: samples per second.

    Returns:
        (num_video_frames, 4 * 26 = 104) float32: logfbank -> stack 4 -> pad/trim to the video
        length -> per-frame layer norm, in AV-HuBERT's order.
    """
    stacked = stack_frames(logfbank_features(samples, sample_rate))
    return normalize_frames(align_to_video(stacked, num_video_frames))


# --- Synchformer ---------------------------------------------------------------------------
def hz_to_mel_htk(freq_hz):
    """HTK Mel scale: ``2595 * log10(1 + f / 700)``."""
    return 2595.0 * np.log10(1.0 + np.asarray(freq_hz, dtype=np.float64) / 700.0)


def mel_to_hz_htk(mel):
    """Inverse of :func:`hz_to_mel_htk`."""
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


def htk_mel_filterbank(
    num_freqs: int, num_mels: int, sample_rate: int, f_min: float = 0.0, f_max: Optional[float] = None
) -> np.ndarray:
    """Triangular Mel filters as torchaudio's ``melscale_fbanks(mel_scale='htk', norm=None)``.

    Args:
        num_freqs: one-sided STFT bins, ``n_fft // 2 + 1``, linearly spaced over 0 .. sr / 2 Hz.
        num_mels: filters; their edges are ``num_mels + 2`` points equally spaced in HTK Mel
            between mel(f_min) and mel(f_max), converted back to Hz.
        sample_rate: samples per second.
        f_min, f_max: band edges in Hz (f_max defaults to sample_rate / 2).

    Returns:
        (num_mels, num_freqs) float64 weights (peak 1, no area normalisation).
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    bin_freqs = np.linspace(0.0, sample_rate / 2, num_freqs)
    edges = mel_to_hz_htk(np.linspace(hz_to_mel_htk(f_min), hz_to_mel_htk(f_max), num_mels + 2))
    widths = np.diff(edges)
    offsets = edges[:, None] - bin_freqs[None, :]  # (num_mels + 2, num_freqs)
    rising = -offsets[:-2] / widths[:-1, None]
    falling = offsets[2:] / widths[1:, None]
    return np.maximum(0.0, np.minimum(rising, falling))


def centered_hann_window(win_length: int, n_fft: int) -> torch.Tensor:
    """(n_fft,) float64 periodic Hann window of ``win_length`` zero-padded on both sides, placed
    where ``torch.stft`` puts a shorter window (left padding ``(n_fft - win_length) // 2``)."""
    left = (n_fft - win_length) // 2
    window = torch.hann_window(win_length, periodic=True, dtype=torch.float64)
    return F.pad(window, (left, n_fft - win_length - left))


class LogMelSpectrogram(nn.Module):
    """``log(MelSpectrogram(x) + offset)`` with torchaudio's MelSpectrogram semantics.

    STFT with a periodic Hann window of ``win_length`` (centred in ``n_fft``), ``center=True``
    with reflect padding, one-sided, no normalisation; power 2 (``|X|^2``); HTK Mel filters
    without normalisation over 0 .. sr / 2. The defaults are Synchformer's settings. Batched over
    any leading axes, differentiable, and computed in the dtype of its input on the module's
    device: the window and filterbank buffers are kept in float64 and cast at use, so float32
    input gets torchaudio's float32 numbers and float64 input float64 accuracy.

    Input ``(..., N)`` samples; output ``(..., n_mels, N // hop_length + 1)`` (a 10240-sample
    segment gives 128 x 65).
    """

    def __init__(
        self,
        sample_rate: int = SYNCHFORMER_SAMPLE_RATE,
        n_fft: int = N_FFT,
        win_length: int = WIN_LENGTH,
        hop_length: int = HOP_LENGTH,
        n_mels: int = N_MELS,
        log_offset: float = LOG_OFFSET,
    ):
        super().__init__()
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.log_offset = log_offset
        # Not persistent: derived from the constructor arguments, so kept out of checkpoints.
        self.register_buffer("window", centered_hann_window(win_length, n_fft), persistent=False)
        filterbank = htk_mel_filterbank(n_fft // 2 + 1, n_mels, sample_rate)
        self.register_buffer("mel_filterbank", torch.from_numpy(filterbank), persistent=False)

    def power_spectrum(self, samples: torch.Tensor) -> torch.Tensor:
        """(B, N) samples -> (B, n_fft // 2 + 1, N // hop_length + 1) STFT power ``|X|^2``."""
        if samples.shape[-1] <= self.n_fft // 2:
            raise ValueError(
                f"audio of {samples.shape[-1]} samples is too short for a centred STFT with "
                f"n_fft {self.n_fft}: reflect padding needs more than {self.n_fft // 2} samples"
            )
        stft = torch.stft(
            samples,
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            window=self.window.to(samples.dtype),
            center=True,
            pad_mode="reflect",
            normalized=False,
            onesided=True,
            return_complex=True,
        )
        return stft.real.square() + stft.imag.square()

    def mel_power(self, samples: torch.Tensor) -> torch.Tensor:
        """(..., N) samples -> (..., n_mels, N // hop_length + 1) Mel power (before the log)."""
        leading_shape = samples.shape[:-1]
        power = self.power_spectrum(samples.reshape(-1, samples.shape[-1]))
        mel = torch.matmul(self.mel_filterbank.to(power.dtype), power)
        return mel.reshape(*leading_shape, *mel.shape[-2:])

    def window_support(self) -> Tuple[int, int]:
        """(first, last + 1): samples around a frame's centre where the window is non-zero."""
        nonzero = torch.nonzero(self.window).flatten()
        return int(nonzero[0]) - self.n_fft // 2, int(nonzero[-1]) + 1 - self.n_fft // 2

    def segments_mel_power(self, samples: torch.Tensor, starts: torch.Tensor, segment_samples: int) -> torch.Tensor:
        """``mel_power`` of the segments ``samples[s : s + segment_samples]`` for s in ``starts``,
        with the STFT frames that segments share computed once.

        A frame whose window lies inside its segment is also a frame of the whole signal when
        the segment starts on the hop grid, so only the few frames at each segment's edges
        (where the segment's own reflect padding enters) are computed per segment. Equal to
        per-segment ``mel_power`` up to the order of float additions in the Mel projection.

        Args:
            samples: (N,) one signal; starts: (S,) segment starts in samples.
        Returns:
            (S, n_mels, segment_samples // hop_length + 1) Mel power.
        """
        hop = self.hop_length
        starts = torch.as_tensor(starts, dtype=torch.long)
        support_first, support_end = self.window_support()
        first_inner = -(support_first // hop)  # ceil(-support_first / hop)
        last_inner = (segment_samples - support_end) // hop
        # excerpts for the edge frames: longer than the reflect padding (n_fft // 2) and than a
        # window plus a hop, on the hop grid, so the frames kept see what the segment's own see
        edge_samples = -(-max(self.n_fft // 2 + 1, support_end - support_first + hop) // hop) * hop
        if (
            bool((starts % hop != 0).any())
            or first_inner > last_inner
            or segment_samples < edge_samples + hop
        ):
            offsets = torch.arange(segment_samples)
            return self.mel_power(samples[starts[:, None] + offsets])

        span_start = int(starts.min())  # on the hop grid: only the samples the segments cover
        samples = samples[span_start: int(starts.max()) + segment_samples]
        starts = starts - span_start
        filterbank = self.mel_filterbank.to(samples.dtype)
        whole = torch.matmul(filterbank, self.power_spectrum(samples[None])[0])  # (n_mels, span // hop + 1)
        inner = whole[:, (starts // hop)[:, None] + torch.arange(first_inner, last_inner + 1)]  # (n_mels, S, k)

        head = samples[starts[:, None] + torch.arange(edge_samples)]
        head_power = self.power_spectrum(head)[:, :, :first_inner]
        tail_first = (segment_samples - edge_samples) // hop * hop  # on the hop grid
        tail = samples[starts[:, None] + torch.arange(tail_first, segment_samples)]
        tail_power = self.power_spectrum(tail)[:, :, last_inner + 1 - tail_first // hop :]
        return torch.cat(
            (torch.matmul(filterbank, head_power), inner.permute(1, 0, 2), torch.matmul(filterbank, tail_power)), dim=-1
        )

    def forward(self, samples: torch.Tensor) -> torch.Tensor:
        return torch.log(self.mel_power(samples) + self.log_offset)


def pad_or_trim_time(spec: torch.Tensor, num_frames: int = AST_NUM_FRAMES) -> torch.Tensor:
    """Zero-pad or trim the last (time) axis of ``(..., F, T)`` to ``num_frames``."""
    difference = num_frames - spec.shape[-1]
    if difference >= 0:
        return F.pad(spec, (0, difference))
    return spec[..., :num_frames]


def synchformer_normalize(log_mel: torch.Tensor) -> torch.Tensor:
    """AST normalisation ``(x - mean) / (2 * std)`` with AudioSet statistics."""
    return (log_mel - AST_MEAN) / (2 * AST_STD)


@functools.lru_cache(maxsize=None)
def _default_log_mel(device: torch.device) -> LogMelSpectrogram:
    # Stateless (buffers only), so one shared instance per device is safe.
    return LogMelSpectrogram().to(device)


def synchformer_audio_features(
    segments: torch.Tensor, log_mel: Optional[LogMelSpectrogram] = None
) -> torch.Tensor:
    """Synchformer's audio input.

    Args:
        segments: (..., 10240) float audio segments at 16 kHz (e.g. (B, S, 10240)).
        log_mel: the spectrogram module to use (default: Synchformer's settings on the
            segments' device).

    Returns:
        (..., 1, 128, 66): log-mel -> zero-pad 65 -> 66 frames -> AST normalisation; the padded
        column therefore holds ``synchformer_normalize(0)``, as in the official pipeline.
    """
    log_mel = _default_log_mel(segments.device) if log_mel is None else log_mel
    return _ast_input(log_mel(segments))


def synchformer_audio_features_at(
    samples: torch.Tensor,
    starts: torch.Tensor,
    segment_samples: int = SEGMENT_SAMPLES,
    log_mel: Optional[LogMelSpectrogram] = None,
) -> torch.Tensor:
    """``synchformer_audio_features`` of the segments of one signal starting at ``starts``,
    sharing the STFT frames of overlapping segments (``LogMelSpectrogram.segments_mel_power``).

    Args:
        samples: (N,) float audio at 16 kHz; starts: (S,) segment starts in samples.
    Returns:
        (S, 1, 128, 66), as ``synchformer_audio_features(samples[starts[:, None] + arange(10240)])``.
    """
    log_mel = _default_log_mel(samples.device) if log_mel is None else log_mel
    mel_power = log_mel.segments_mel_power(samples, starts, segment_samples)
    return _ast_input(torch.log(mel_power + log_mel.log_offset))


def _ast_input(log_mel: torch.Tensor) -> torch.Tensor:
    """(..., 128, 65) log-mel -> (..., 1, 128, 66) padded and normalised AST input."""
    return synchformer_normalize(pad_or_trim_time(log_mel)).unsqueeze(-3)
