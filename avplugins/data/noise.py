"""Additive noise at a signal-to-noise ratio, for noise-robust training and noisy test sets.

A :class:`NoiseBank` holds noise waveforms read from an AV-HuBERT-style manifest (its audio
column) and draws segments from them; ``babble`` mixes several of them (speech from other
utterances) into one, as AV-HuBERT's babble noise does. :func:`mix_at_snr` scales the noise so
that ``10 log10(P_clean / P_noise) = snr_db`` over the utterance.
"""
import logging
from typing import List, Optional

import numpy as np

from avplugins.data.manifest import read_manifest
from avplugins.data.media import read_audio

logger = logging.getLogger(__name__)


def mix_at_snr(clean: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """Add ``noise`` to ``clean`` at ``snr_db`` dB.

    Args:
        clean: (N,) float samples.
        noise: (N,) float samples (same length; see :meth:`NoiseBank.draw`).
        snr_db: target ratio of mean powers in dB.
    Returns:
        (N,) float32. Silent ``clean`` (power 0) gets the noise at its own power: there is no
        speech level to relate the SNR to.
    """
    if clean.shape != noise.shape:
        raise ValueError(f"clean {clean.shape} and noise {noise.shape} must have the same shape")
    clean_power = float(np.mean(np.square(clean, dtype=np.float64)))
    noise_power = float(np.mean(np.square(noise, dtype=np.float64)))
    if noise_power == 0.0:
        return clean.astype(np.float32)
    if clean_power == 0.0:
        return (clean + noise).astype(np.float32)
    scale = np.sqrt(clean_power / (noise_power * 10.0 ** (snr_db / 10.0)))
    return (clean + scale * noise).astype(np.float32)


def fit_length(noise: np.ndarray, num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """(num_samples,) from ``noise``: a random window when it is long enough, else tiled."""
    if len(noise) == 0:
        raise ValueError("empty noise waveform")
    if len(noise) < num_samples:
        noise = np.tile(noise, int(np.ceil(num_samples / len(noise))))
    start = int(rng.integers(0, len(noise) - num_samples + 1))
    return noise[start : start + num_samples]


class NoiseBank:
    """Noise waveforms (16 kHz mono float32) loaded once from a manifest.

    Args:
        manifest_path: ``.tsv`` whose audio column lists the noise files.
        babble_voices: 1 for plain noise; K > 1 mixes K random waveforms (babble).
        max_files: load at most this many files (the first ones), to bound memory.
    """

    def __init__(self, manifest_path: str, babble_voices: int = 1, max_files: Optional[int] = None,
                 sample_rate: int = 16000):
        _, entries = read_manifest(manifest_path)
        entries = [entry for entry in entries if entry.audio_path]
        if max_files is not None:
            entries = entries[:max_files]
        if not entries:
            raise ValueError(f"{manifest_path}: no rows with an audio file; a noise manifest needs audio")
        self.waveforms: List[np.ndarray] = [read_audio(entry.audio_path, sample_rate=sample_rate)
                                            for entry in entries]
        self.babble_voices = babble_voices
        logger.info("noise bank: %d waveforms from %s, %d voice(s) per draw",
                    len(self.waveforms), manifest_path, babble_voices)

    def draw(self, num_samples: int, rng: np.random.Generator) -> np.ndarray:
        """(num_samples,) float32 noise: the sum of ``babble_voices`` random waveform windows."""
        picks = rng.integers(0, len(self.waveforms), size=self.babble_voices)
        mixture = sum(fit_length(self.waveforms[pick], num_samples, rng).astype(np.float64) for pick in picks)
        return np.asarray(mixture, dtype=np.float32)
