"""Speech clips (the CPU stand-in for LRS3): eSpeak NG utterances with a mouth video driven by
the phonemes being spoken.

Each clip: silence, a random word sequence from `VOCABULARY` spoken by a random eSpeak voice
at a random rate and pitch, silence; pink background noise at 20-40 dB SNR; a 25 fps gray
mouth crop whose lips follow the phonemes (see `visemes`, `mouth`).
"""
from dataclasses import dataclass

import numpy as np
from scipy.signal import resample_poly

from preprocess.synth import mouth, visemes
from preprocess.synth.common import (
    AUDIO_SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    VIDEO_FPS,
    clip_rng,
    frames_for_duration,
    noise_for_snr,
    pink_noise,
    rms,
    write_clip,
)
from preprocess.synth.tts import get_espeak

# GRID-like words whose phonemes differ visibly: bilabials (bin, place, purple), rounding
# (two, blue, soon, move), open vowels (stop, at, now), labiodentals (five, four, f), ...
VOCABULARY = (
    "zero one two three four five six seven eight nine "
    "blue green red white black yellow orange purple "
    "bin lay place set move stop open close go put "
    "at by in with again now please soon "
    "a f j m o q u y"
).split()
BASE_VOICES = ("en-us", "en", "en-gb-x-rp", "en-gb-scotland", "en-us-nyc", "en-029")
VOICE_VARIANTS = ("", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4")
RATE_WPM = (130, 190)
PITCH = (30, 70)
SNR_DB = (20.0, 40.0)
LEADING_SILENCE_S = (0.15, 0.5)
MIN_TRAILING_SILENCE_S = 0.15


@dataclass(frozen=True)
class SpeechOptions:
    """Corpus-wide settings of speech clips."""

    min_duration_s: float = 2.0
    max_duration_s: float = 4.0
    image_size: int = 96


@dataclass(frozen=True)
class Voice:
    """How eSpeak speaks one clip."""

    name: str
    rate_wpm: int
    pitch: int
    rand_seed: int


def sample_voice(rng):
    """A random eSpeak voice (accent + variant), rate (words/min) and base pitch."""
    base = BASE_VOICES[rng.integers(len(BASE_VOICES))]
    variant = VOICE_VARIANTS[rng.integers(len(VOICE_VARIANTS))]
    return Voice(
        name=f"{base}+{variant}" if variant else base,
        rate_wpm=int(rng.integers(RATE_WPM[0], RATE_WPM[1] + 1)),
        pitch=int(rng.integers(PITCH[0], PITCH[1] + 1)),
        rand_seed=int(rng.integers(2**31)),
    )


def speak(words, voice):
    """`tts.Utterance` of the words (a list of strings) in `voice`."""
    return get_espeak().synthesize(" ".join(words), voice.name, voice.rate_wpm, voice.pitch, voice.rand_seed)


def fit_words(rng, voice, max_speech_s):
    """(words, utterance): the longest prefix of a random word sequence whose speech lasts at
    most `max_speech_s` seconds, but at least one word (which may last longer)."""
    max_words = max(1, int(np.ceil(max_speech_s * 5)) + 1)  # more than fit: eSpeak says < 4 words/s at 190 wpm
    candidates = [VOCABULARY[i] for i in rng.integers(len(VOCABULARY), size=max_words)]
    count = max(1, min(max_words, int(max_speech_s * voice.rate_wpm / 60)))
    utterance = speak(candidates[:count], voice)
    for _ in range(3):  # jump close to the answer: speech lasts about in proportion to the words
        guess = max(1, min(max_words, int(count * max_speech_s / max(utterance.duration_s, 1e-3))))
        if guess == count:
            break
        count, utterance = guess, speak(candidates[:guess], voice)
    while count > 1 and utterance.duration_s > max_speech_s:
        count -= 1
        utterance = speak(candidates[:count], voice)
    while count < max_words:
        longer = speak(candidates[: count + 1], voice)
        if longer.duration_s > max_speech_s:
            break
        count, utterance = count + 1, longer
    return candidates[:count], utterance


def to_16k(samples, sample_rate):
    """int16 speech at `sample_rate` (eSpeak: 22050 Hz) -> float64 in [-1, 1] at 16 kHz."""
    audio = samples.astype(np.float64) / 32768.0
    if sample_rate == AUDIO_SAMPLE_RATE:
        return audio
    divisor = np.gcd(AUDIO_SAMPLE_RATE, sample_rate)
    return resample_poly(audio, AUDIO_SAMPLE_RATE // divisor, sample_rate // divisor)


def speech_track(rng, speech, num_samples, offset_samples):
    """float32 (num_samples,) track: `speech` (16 kHz) placed at `offset_samples`, normalised to
    a random peak level, plus pink noise at a random 20-40 dB SNR (relative to the speech)."""
    track = np.zeros(num_samples)
    track[offset_samples : offset_samples + speech.size] = speech[: num_samples - offset_samples]
    track *= rng.uniform(0.3, 0.8) / max(np.abs(track).max(), 1e-9)
    speech_rms = rms(track[offset_samples : offset_samples + speech.size])
    track += noise_for_snr(speech_rms, rng.uniform(*SNR_DB), pink_noise(rng, num_samples))
    return np.clip(track, -1.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class SpeechClip:
    """One rendered clip: transcript, audio float32 (N,) at 16 kHz, gray video uint8 (T, H, W)
    at 25 fps with N = 640 T, and where the speech lies (seconds)."""

    words: tuple
    audio: np.ndarray
    video: np.ndarray
    speech_start_s: float
    speech_end_s: float


def make_speech_clip(rng, options, words=None):
    """Render one random clip; `words` (a list) fixes the transcript instead of drawing it."""
    voice = sample_voice(rng)
    target_s = rng.uniform(options.min_duration_s, options.max_duration_s)
    leading_s = rng.uniform(*LEADING_SILENCE_S)
    if words is None:
        words, utterance = fit_words(rng, voice, target_s - leading_s - MIN_TRAILING_SILENCE_S)
    else:
        utterance = speak(words, voice)
    speech = to_16k(utterance.samples, utterance.sample_rate)
    # a clip never cuts speech: too long an utterance lengthens the clip
    num_frames = max(frames_for_duration(target_s),
                     int(np.ceil((leading_s + speech.size / AUDIO_SAMPLE_RATE + MIN_TRAILING_SILENCE_S) * VIDEO_FPS)))
    offset_samples = int(round(leading_s * AUDIO_SAMPLE_RATE))
    audio = speech_track(rng, speech, num_frames * SAMPLES_PER_FRAME, offset_samples)

    offset_s = offset_samples / AUDIO_SAMPLE_RATE
    segments = visemes.phonemes_to_segments(utterance.phonemes, offset_s)
    frame_times_s = np.arange(num_frames) / VIDEO_FPS  # frame k shows time k / 25, like audio sample 640 k
    shape = visemes.viseme_trajectory(segments, frame_times_s, strength=rng.uniform(0.8, 1.15))
    appearance = mouth.sample_appearance(rng, options.image_size)
    motion = mouth.sample_head_motion(rng, num_frames, VIDEO_FPS)
    video = mouth.render_mouth(shape, appearance, motion, options.image_size, rng)
    return SpeechClip(tuple(words), audio, video, offset_s, offset_s + utterance.duration_s)


def write_speech_clip(out_dir, split, clip_id, clip_index, seed, options):
    """Make clip `clip_index` of the corpus with `seed`, write it (`write_clip`) and return its
    `ClipResult` with the transcript."""
    clip = make_speech_clip(clip_rng(seed, clip_index), options)
    return write_clip(out_dir, split, clip_id, clip_index, clip, label=" ".join(clip.words))
