"""Pieces both synthetic corpora share: per-clip random streams, clip timing, noise, writing."""
import os
from dataclasses import dataclass

import numpy as np

VIDEO_FPS = 25
AUDIO_SAMPLE_RATE = 16000
SAMPLES_PER_FRAME = AUDIO_SAMPLE_RATE // VIDEO_FPS  # 640: audio and video end together
_EDGE_PX = 0.7  # width of the soft edge of drawn shapes


def clip_rng(seed, clip_index):
    """The random generator of one clip, a function of (corpus seed, clip index) only, so a
    clip is the same whichever worker makes it and in whatever order."""
    return np.random.default_rng([int(seed), int(clip_index)])


def frames_for_duration(duration_s):
    """Whole video frames (at 25 fps) closest to `duration_s` seconds, at least one."""
    return max(1, int(round(duration_s * VIDEO_FPS)))


def soft_inside(signed_distance):
    """Anti-aliased coverage in [0, 1] of a shape from the signed distance (pixels, negative
    inside) of each pixel to its outline."""
    return np.clip(0.5 - signed_distance / (2 * _EDGE_PX), 0.0, 1.0)


def smooth_noise(rng, num_steps, rate_hz, max_frequency_hz, channels=1):
    """Slowly varying random signals (num_steps, channels) in [-1, 1] sampled at `rate_hz`: a
    sum of sinusoids with random frequencies below `max_frequency_hz` and random phases."""
    num_components = 4
    times = np.arange(num_steps)[:, None, None] / rate_hz
    frequencies = rng.uniform(0.05, max_frequency_hz, (num_components, channels))
    phases = rng.uniform(0, 2 * np.pi, (num_components, channels))
    weights = rng.uniform(0.5, 1.0, (num_components, channels))
    signal = (weights * np.sin(2 * np.pi * frequencies * times + phases)).sum(axis=1)
    return signal / weights.sum(axis=0)


def pink_noise(rng, num_samples):
    """Unit-RMS noise (num_samples,) float64 with a 1/f power spectrum (equal power per octave)."""
    spectrum = np.fft.rfft(rng.standard_normal(num_samples))
    frequency_index = np.arange(spectrum.size, dtype=np.float64)
    frequency_index[0] = 1.0
    noise = np.fft.irfft(spectrum / np.sqrt(frequency_index), n=num_samples)
    return noise / max(np.sqrt(np.mean(noise**2)), 1e-12)


def rms(signal):
    """Root mean square of an array (0 for an empty one)."""
    return float(np.sqrt(np.mean(np.square(signal, dtype=np.float64)))) if signal.size else 0.0


def noise_for_snr(signal_rms, snr_db, noise):
    """`noise` scaled so that signal_rms / rms(noise) is `snr_db` decibels."""
    return noise * (signal_rms / 10 ** (snr_db / 20) / max(rms(noise), 1e-12))


@dataclass(frozen=True)
class ClipResult:
    """What a worker reports about one written clip; media paths are relative to the corpus
    folder, counts are of the arrays written (frames at 25 fps, samples at 16 kHz)."""

    index: int
    clip_id: str
    split: str
    video_path: str
    audio_path: str
    num_video_frames: int
    num_audio_samples: int
    label: str = ""  # transcript (speech)
    events: tuple = ()  # ((event type, time in seconds), ...) (sparse)

    @property
    def duration_s(self):
        return self.num_audio_samples / AUDIO_SAMPLE_RATE

    def manifest_row(self):
        """(id, video_path, audio_path, num_video_frames, num_audio_samples) for `write_manifest`."""
        return (self.clip_id, self.video_path, self.audio_path, self.num_video_frames, self.num_audio_samples)


def write_clip(out_dir, split, clip_id, clip_index, clip, **details):
    """Write `<split>/<clip_id>.mp4` (`clip.video` uint8 (T, H, W[, 3]) at 25 fps with
    `clip.audio` float32 (N,) at 16 kHz muxed in) and the same audio as `<split>/<clip_id>.wav`
    under `out_dir`; return the clip's `ClipResult` (media paths relative to `out_dir`), with
    `details` (`label` or `events`)."""
    from avplugins.data.media import write_audio, write_video

    video_path, audio_path = f"{split}/{clip_id}.mp4", f"{split}/{clip_id}.wav"
    os.makedirs(os.path.join(out_dir, split), exist_ok=True)
    write_video(os.path.join(out_dir, video_path), clip.video, VIDEO_FPS, audio=clip.audio, sample_rate=AUDIO_SAMPLE_RATE)
    write_audio(os.path.join(out_dir, audio_path), clip.audio, sample_rate=AUDIO_SAMPLE_RATE)
    return ClipResult(clip_index, clip_id, split, video_path, audio_path, len(clip.video), len(clip.audio), **details)
