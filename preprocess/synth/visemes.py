"""From eSpeak phonemes to smooth mouth-shape trajectories (visemes with co-articulation).

A viseme is a target mouth shape, five articulation parameters in [0, 1] (`PARAMETERS`), and
a dominance: how strongly the segment imposes its shape on its neighbours. Trajectories blend
the targets of all segments with the Cohen & Massaro (1993) dominance model: every segment's
dominance is flat over its own span and decays exponentially outside it, and the shape at
time t is the dominance-weighted mean of the targets. Rounding (w, u) dominates strongly and
velars (k, g) barely constrain the lips, taking the shape of the vowels around them.

Some consonants need contact, not a tendency: the lips must close for p, b, m and the lower
lip must touch the teeth for f, v, however short the consonant. Those parameters are then
pulled to their targets over the consonant's span, releasing within a few tens of ms.
"""
from dataclasses import dataclass

import numpy as np

PARAMETERS = ("opening", "width", "rounding", "teeth", "tongue")

# (opening, width, rounding, teeth, tongue), dominance
_VISEMES = {
    "rest": ((0.00, 0.45, 0.10, 0.0, 0.0), 1.0),
    "bilabial": ((0.00, 0.42, 0.15, 0.0, 0.0), 3.0),
    "labiodental": ((0.10, 0.50, 0.00, 1.0, 0.0), 3.0),
    "dental": ((0.22, 0.55, 0.00, 0.9, 1.0), 2.5),
    "alveolar": ((0.18, 0.60, 0.00, 0.7, 0.3), 1.0),
    "sibilant": ((0.08, 0.65, 0.00, 1.0, 0.0), 2.0),
    "lateral": ((0.30, 0.55, 0.00, 0.5, 0.8), 1.0),
    "rhotic": ((0.18, 0.35, 0.60, 0.3, 0.0), 1.5),
    "postalveolar": ((0.20, 0.30, 0.85, 0.8, 0.0), 2.5),
    "labiovelar": ((0.08, 0.12, 1.00, 0.0, 0.0), 4.0),
    "palatal": ((0.20, 0.80, 0.00, 0.7, 0.0), 1.5),
    "velar": ((0.30, 0.50, 0.10, 0.3, 0.0), 0.3),
    "i": ((0.22, 0.95, 0.00, 0.8, 0.0), 1.5),
    "I": ((0.30, 0.85, 0.00, 0.6, 0.0), 1.5),
    "e": ((0.45, 0.80, 0.00, 0.6, 0.0), 1.5),
    "E": ((0.55, 0.75, 0.00, 0.5, 0.0), 1.5),
    "a": ((0.85, 0.70, 0.00, 0.4, 0.2), 1.5),
    "A": ((1.00, 0.55, 0.10, 0.3, 0.2), 1.5),
    "@": ((0.40, 0.55, 0.10, 0.3, 0.0), 1.2),
    "3": ((0.35, 0.45, 0.40, 0.4, 0.0), 1.5),
    "V": ((0.60, 0.60, 0.10, 0.3, 0.1), 1.5),
    "0": ((0.75, 0.35, 0.60, 0.2, 0.0), 1.5),
    "O": ((0.60, 0.30, 0.80, 0.1, 0.0), 1.5),
    "o": ((0.45, 0.25, 0.90, 0.0, 0.0), 1.5),
    "U": ((0.30, 0.25, 0.85, 0.0, 0.0), 2.0),
    "u": ((0.20, 0.12, 1.00, 0.0, 0.0), 2.0),
}
# visemes whose listed parameters must be reached: {viseme: {parameter: target}}
_CONTACTS = {
    "bilabial": {"opening": 0.0},
    "labiodental": {"opening": 0.10, "teeth": 1.0},
}

# eSpeak consonant mnemonics (modifier marks stripped) -> viseme
_CONSONANTS = {
    **dict.fromkeys(("p", "b", "m"), "bilabial"),
    **dict.fromkeys(("f", "v"), "labiodental"),
    **dict.fromkeys(("T", "D"), "dental"),
    **dict.fromkeys(("t", "d", "n"), "alveolar"),
    **dict.fromkeys(("s", "z"), "sibilant"),
    **dict.fromkeys(("l",), "lateral"),
    **dict.fromkeys(("r", "R"), "rhotic"),
    **dict.fromkeys(("S", "Z", "tS", "dZ"), "postalveolar"),
    **dict.fromkeys(("w", "W"), "labiovelar"),
    **dict.fromkeys(("j",), "palatal"),
    **dict.fromkeys(("k", "g", "N", "h", "x", "?", "C"), "velar"),
}
_VOWEL_LETTERS = frozenset("iIeEaA@3V0OoUu")
# marks eSpeak puts around mnemonics: stress, length, variants, syllabic/rhotic colouring
_STRESS_MARKS = "'%,=!"
_MODIFIERS = ":#2345;[/-^~`"


@dataclass(frozen=True)
class Segment:
    """A span (seconds) during which the mouth aims at `viseme`."""

    viseme: str
    start_s: float
    end_s: float


def visemes_of_phoneme(name):
    """eSpeak mnemonic (e.g. "'aI", "dZ", "@L", "_:") -> viseme names in temporal order.

    Diphthongs give one viseme per vowel quality ("aI" -> a, I); syllabic "L" adds a lateral;
    pauses ("_", "_:") are rest; unknown mnemonics fall back to the weak velar shape.
    """
    stripped = name.lstrip(_STRESS_MARKS)
    if not stripped or stripped.startswith("_"):
        return ["rest"]
    base = stripped.rstrip(_MODIFIERS)
    if base in _CONSONANTS:
        return [_CONSONANTS[base]]
    if stripped[0] in _VOWEL_LETTERS:
        visemes = [c for c in stripped if c in _VOWEL_LETTERS]
        if stripped.endswith("L"):
            visemes.append("lateral")
        elif stripped.endswith("R"):
            visemes.append("rhotic")
        return visemes
    return ["velar"]


def phonemes_to_segments(phonemes, offset_s=0.0):
    """`tts.Phoneme`s -> viseme `Segment`s shifted by `offset_s`; a diphthong's span is shared
    equally between its visemes."""
    segments = []
    for phoneme in phonemes:
        visemes = visemes_of_phoneme(phoneme.name)
        edges = np.linspace(phoneme.start_s, phoneme.end_s, len(visemes) + 1) + offset_s
        segments += [Segment(v, float(edges[i]), float(edges[i + 1])) for i, v in enumerate(visemes)]
    return segments


def _distance_to_spans(segments, frame_times_s, lead_s):
    """Seconds (T, S) from each time to each segment's span shifted `lead_s` earlier (0 inside)."""
    starts = np.array([s.start_s for s in segments]) - lead_s
    ends = np.array([s.end_s for s in segments]) - lead_s
    distance = np.maximum(starts[None, :] - frame_times_s[:, None], frame_times_s[:, None] - ends[None, :])
    return np.maximum(distance, 0.0)


def viseme_trajectory(segments, frame_times_s, lead_s=0.04, spread_s=0.05, contact_release_s=0.025, strength=1.0):
    """Mouth parameters (T, 5) (columns `PARAMETERS`, in [0, 1]) at `frame_times_s` (T,) seconds.

    Each segment acts `lead_s` early (the lips anticipate the sound); its dominance decays as
    exp(-distance / `spread_s`) outside its span. Contacts (`_CONTACTS`) hold over their span
    and let go as exp(-(distance / `contact_release_s`)^2). Time outside all segments is rest.
    `strength` scales the opening (a speaker's articulation effort).
    """
    frame_times_s = np.asarray(frame_times_s, dtype=np.float64)
    if not segments:  # silence
        return np.tile(np.array(_VISEMES["rest"][0]), (len(frame_times_s), 1))
    first, last = segments[0].start_s, segments[-1].end_s
    segments = [Segment("rest", first - 1e3, first), *segments, Segment("rest", last, last + 1e3)]
    distance = _distance_to_spans(segments, frame_times_s, lead_s)  # (T, S)
    targets = np.array([_VISEMES[s.viseme][0] for s in segments])  # (S, 5)
    dominance = np.array([_VISEMES[s.viseme][1] for s in segments])[None, :] * np.exp(-distance / spread_s)
    shape = dominance @ targets / dominance.sum(axis=1, keepdims=True)
    for index, segment in enumerate(segments):
        for parameter, target in _CONTACTS.get(segment.viseme, {}).items():
            hold = np.exp(-((distance[:, index] / contact_release_s) ** 2))
            column = PARAMETERS.index(parameter)
            shape[:, column] += hold * (target - shape[:, column])
    shape[:, 0] = np.clip(shape[:, 0] * strength, 0.0, 1.0)
    return shape
