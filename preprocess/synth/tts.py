"""eSpeak NG text-to-speech through ctypes, with phoneme timing.

The `espeakng_loader` wheel ships libespeak-ng and its data, so nothing is installed system-wide.
The library keeps global state, so one `Espeak` per process (see `get_espeak`).
"""
import _ctypes
import ctypes
from dataclasses import dataclass

import numpy as np

# speak_lib.h (eSpeak NG 1.52, API revision 12)
AUDIO_OUTPUT_SYNCHRONOUS = 2
INITIALIZE_PHONEME_EVENTS = 0x0001
POS_CHARACTER = 1
CHARS_UTF8 = 1
EVENT_LIST_TERMINATED = 0
EVENT_PHONEME = 7
PARAM_RATE = 1
PARAM_PITCH = 3
EE_OK = 0


class _EventId(ctypes.Union):
    """The `id` union of `espeak_EVENT`; phoneme events fill `string` with the mnemonic."""

    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    """`espeak_EVENT`; `sample` is the event's position in output samples (finer than the ms field)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


@dataclass(frozen=True)
class Phoneme:
    """One spoken phoneme: eSpeak mnemonic (stress marks kept) and its span in seconds."""

    name: str
    start_s: float
    end_s: float


@dataclass(frozen=True)
class Utterance:
    """Synthesised speech: int16 `samples` (N,) at `sample_rate` Hz and the phonemes in order."""

    samples: np.ndarray
    sample_rate: int
    phonemes: tuple

    @property
    def duration_s(self):
        return len(self.samples) / self.sample_rate


class Espeak:
    """Synchronous eSpeak NG synthesiser reporting phoneme events (one per process).

    eSpeak keeps signal state (pitch flutter phase, resonators) from one utterance to the next, so
    the same call would sound slightly different depending on what was spoken before. Every
    `synthesize` therefore starts from a freshly loaded library (about 1 ms): its output depends
    only on its arguments, whichever worker process runs it.
    """

    def __init__(self):
        import espeakng_loader

        self._library_path = espeakng_loader.get_library_path()
        self._data_path = espeakng_loader.get_data_path()
        self._lib = None
        self.sample_rate = None
        self._chunks = []
        self._events = []
        # one ctypes callback object for the process: the C library keeps calling it
        self._callback = _SynthCallback(self._collect)

    def _reload(self):
        """Unload the library (resetting all its static state), load and initialise it again."""
        if self._lib is not None:
            self._lib.espeak_Terminate()
            _ctypes.dlclose(self._lib._handle)
        self._lib = ctypes.CDLL(self._library_path)
        self.sample_rate = self._lib.espeak_Initialize(
            AUDIO_OUTPUT_SYNCHRONOUS, 0, self._data_path.encode(), INITIALIZE_PHONEME_EVENTS
        )
        if self.sample_rate <= 0:
            raise RuntimeError(f"eSpeak NG failed to initialise with data at {self._data_path}")
        self._lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, num_samples, events):
        if wav and num_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        i = 0
        while events[i].type != EVENT_LIST_TERMINATED:
            event = events[i]
            if event.type == EVENT_PHONEME:
                name = bytes(event.id.string).split(b"\0")[0].decode("utf-8", "replace")
                self._events.append((event.sample, name))
            i += 1
        return 0

    def synthesize(self, text, voice="en-us", rate_wpm=160, pitch=50, rand_seed=0):
        """Speak `text` with eSpeak voice name `voice` (e.g. "en-gb-x-rp+f2"), `rate_wpm` words per
        minute and base `pitch` (0-99); `rand_seed` fixes eSpeak's internal randomness."""
        self._reload()
        if self._lib.espeak_SetVoiceByName(voice.encode()) != EE_OK:
            raise ValueError(f"eSpeak NG has no voice {voice!r}: use a name like 'en-us' or 'en-us+f2'")
        self._lib.espeak_SetParameter(PARAM_RATE, int(rate_wpm), 0)
        self._lib.espeak_SetParameter(PARAM_PITCH, int(pitch), 0)
        self._lib.espeak_ng_SetRandSeed(int(rand_seed))
        self._chunks, self._events = [], []
        encoded = text.encode()
        status = self._lib.espeak_Synth(encoded, len(encoded) + 1, 0, POS_CHARACTER, 0, CHARS_UTF8, None, None)
        if status != EE_OK:
            raise RuntimeError(f"eSpeak NG failed (status {status}) on text {text!r}")
        samples = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        return Utterance(samples, self.sample_rate, _phoneme_spans(self._events, len(samples), self.sample_rate))


def _phoneme_spans(events, num_samples, sample_rate):
    """(sample, name) onsets -> `Phoneme`s, each ending where the next starts (the last at the end)."""
    onsets = [sample for sample, _ in events] + [num_samples]
    return tuple(
        Phoneme(name, onsets[i] / sample_rate, max(onsets[i], onsets[i + 1]) / sample_rate)
        for i, (_, name) in enumerate(events)
    )


_ESPEAK = None


def get_espeak():
    """The process-wide `Espeak`, initialised on first use."""
    global _ESPEAK
    if _ESPEAK is None:
        _ESPEAK = Espeak()
    return _ESPEAK
