"""Decoding and encoding of audio and video files with PyAV (FFmpeg inside the wheel).

Every reader works on one timeline: seconds from the file's origin, which is the earliest
start of its audio and video streams (0 for files we write; clipped at 0 so that a negative
audio start, e.g. AAC encoder priming, never shifts the video). Video frames are placed by
their presentation timestamps and audio samples by the timestamps of their decoded frames,
so audio sample ``i`` (at ``sample_rate``) and video time ``k / fps`` refer to the same
instant. FFmpeg's decoders already drop the AAC priming samples an mp4 edit list declares;
anything still before the origin is dropped here.

Reads seek (backward to a keyframe) when the window starts after the origin, decode only
the stream they need and stop once the window is complete. Every FFmpeg failure surfaces
as :class:`MediaError`, whose message names the file, the problem and what to do.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import os
import tempfile
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Iterator, List, Optional, Tuple

import av
import numpy as np
from av.video.reformatter import VideoReformatter

# User-given seconds and rates are read to the microsecond, so that 0.6 means 3/5 s.
_MAX_DENOMINATOR = 1_000_000
# Audio timestamps closer than this to the running sample count are rounding, not gaps.
_AUDIO_GAP_TOLERANCE_S = Fraction(1, 50)
# Native audio decoded beyond each edge of a window so that the resampler's filter and the
# decoder's overlapping transforms (AAC) have settled inside the window.
_RESAMPLER_CONTEXT_S = Fraction(1, 20)
_AUDIO_DECODER_WARMUP_S = Fraction(1, 10)
# How far before the needed time the first seek aims; multiplied when it lands too late.
_SEEK_LEAD_S = Fraction(1, 5)
_SEEK_LEAD_GROWTH = 8
_PCM_SCALE = 32768.0
# Containers whose stream durations come from an index (not estimated from the bitrate), and
# how far the packets may end before that duration without calling the file truncated.
_INDEXED_FORMATS = {"mp4", "matroska"}
_TRUNCATION_TOLERANCE_S = Fraction(1, 10)
# Decoded frames one read may return: more means full-resolution frames of a long or huge
# video that the caller forgot to scale (``size=``), which would exhaust memory.
MAX_DECODED_BYTES = 4 * 2**30

# FFmpeg reads this many bytes to probe a file whose header already says everything (WAV).
_HEADER_ONLY_PROBE = {"probesize": "32"}

_HINT_CORRUPT = ("check that the file is complete and plays (ffprobe FILE); re-encode it, e.g. "
                 "`ffmpeg -i FILE -c:v libx264 -pix_fmt yuv420p -c:a aac OUT.mp4`")


class MediaError(RuntimeError):
    """A media file could not be read or written; ``path`` names it."""

    def __init__(self, path, message):
        self.path = os.fspath(path)
        super().__init__(f"{self.path}: {message}")


@dataclass(frozen=True)
class MediaInfo:
    """What a file holds. Counts are at the stream's native rate; ``None`` where absent."""

    path: str
    has_video: bool
    has_audio: bool
    video_fps: Optional[float]
    num_video_frames: Optional[int]
    width: Optional[int]
    height: Optional[int]
    audio_sample_rate: Optional[int]
    audio_channels: Optional[int]
    num_audio_samples: Optional[int]
    duration_s: float


# ----------------------------------------------------------------------------- opening files


def _describe_ffmpeg_error(error: av.error.FFmpegError) -> str:
    """A message for an FFmpeg failure: what it said and what the user can do."""
    if isinstance(error, FileNotFoundError):
        return "no such file or directory; check the path (relative paths start at the current directory)"
    if isinstance(error, PermissionError):
        return "permission denied; check the file's permissions"
    if isinstance(error, IsADirectoryError):
        return "is a directory, not a media file; pass the path of a file"
    if isinstance(error, av.error.InvalidDataError):
        return f"not a readable media file, or it is truncated or corrupt ({error}); " + _HINT_CORRUPT
    return f"FFmpeg failed ({type(error).__name__}: {error}); " + _HINT_CORRUPT


@contextlib.contextmanager
def _converted_errors(path) -> Iterator[None]:
    """Turn errors raised by PyAV / FFmpeg inside the block into :class:`MediaError`."""
    try:
        yield
    except av.error.FFmpegError as error:
        raise MediaError(path, _describe_ffmpeg_error(error)) from error


@contextlib.contextmanager
def _open_input(path) -> Iterator[av.container.InputContainer]:
    """Open ``path`` for reading (once per public call), closing it afterwards."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MediaError(path, "no such file; check the path (relative paths start at the current directory)")
    if os.path.isdir(path):
        raise MediaError(path, "is a directory, not a media file; pass the path of a file")
    if not os.path.isfile(path):
        # FFmpeg would block forever opening a named pipe that has no writer
        raise MediaError(path, "is not a regular file (a named pipe or a device); copy the media into a file")
    if os.path.getsize(path) == 0:
        raise MediaError(path, "the file is empty (0 bytes); it was not written completely, create it again")
    with _converted_errors(path):
        container = _open_probed(path)
        try:
            yield container
        finally:
            container.close()


def _is_wav(path: str) -> bool:
    """Whether the file starts with a RIFF (or RF64) WAVE header."""
    with open(path, "rb") as handle:
        head = handle.read(12)
    return head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE"


def _open_probed(path: str) -> av.container.InputContainer:
    """``av.open(path)``; a WAV file is opened from its header alone.

    A WAV header declares its one stream completely, but FFmpeg's default probing still reads
    and parses up to seconds of samples to "find" the stream's parameters: 8-10 ms per open, more
    than decoding a 3 s utterance. If the header left the rate or channels unknown, the file is
    opened again with the default probing.
    """
    if _is_wav(path):
        container = av.open(path, mode="r", container_options=_HEADER_ONLY_PROBE)
        audio = container.streams.audio
        if audio and all(stream.codec_context.sample_rate and stream.codec_context.channels for stream in audio):
            return container
        container.close()
    return av.open(path, mode="r")


def _video_stream(container, path=None):
    """The first video stream that is not cover art; None, or MediaError when ``path`` is given."""
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    if path is not None:
        raise MediaError(path, "has no video stream (audio only?); use read_audio for it, "
                               "or pass a video file")
    return None


def _audio_stream(container, path=None):
    """The first audio stream; None, or MediaError when ``path`` is given."""
    if container.streams.audio:
        return container.streams.audio[0]
    if path is not None:
        raise MediaError(path, "has no audio stream; read its frames with read_video, "
                               "or pass a file with sound")
    return None


def _timeline_origin(container) -> Fraction:
    """Seconds of the file's time 0: the earliest audio/video stream start, at least 0."""
    starts = [stream.start_time * stream.time_base
              for stream in list(container.streams.video) + list(container.streams.audio)
              if stream.start_time is not None and stream.time_base is not None]
    return max(Fraction(0), min(starts)) if starts else Fraction(0)


def _exact(value: float, name: str) -> Fraction:
    """``value`` (seconds or a rate) as a fraction, read to the microsecond; must be >= 0."""
    if value is None or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return Fraction(value).limit_denominator(_MAX_DENOMINATOR)


def _positive_rate(value: float, name: str) -> Fraction:
    """A frame or sample rate as a fraction; must be > 0."""
    rate = _exact(value, name)
    if rate <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return rate


# ----------------------------------------------------------------------------- stream decoding


class _StreamReader:
    """Demuxes and decodes one stream of an open container on the file's timeline.

    Tracks ``end_s``, the latest packet end (pts + duration) seen, in seconds from the
    origin; ``durations_known`` is False once a packet came without a duration (then
    ``end_s`` uses ``fallback_duration_s`` for it).
    """

    def __init__(self, container, stream, path, timeout_s: Optional[float],
                 fallback_duration_s: Fraction = Fraction(0)):
        self.container = container
        self.stream = stream
        self.time_base = stream.time_base  # PyAV builds a new Fraction on every access
        self.path = path
        self.timeout_s = timeout_s
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.origin_s = _timeline_origin(container)
        self.fallback_duration_s = fallback_duration_s
        self.durations_known = True
        self._seeked = False
        # Latest packet end as an integer timestamp (packets with a duration) and in seconds
        # (packets without one); integers keep the per-packet bookkeeping cheap.
        self._end_pts: Optional[int] = None
        self._fallback_end_s: Optional[Fraction] = None

    @property
    def end_s(self) -> Optional[Fraction]:
        """The latest packet end seen (seconds from the origin), None before any packet."""
        ends = [end for end in (self.seconds(self._end_pts), self._fallback_end_s) if end is not None]
        return max(ends) if ends else None

    def seconds(self, pts: Optional[int]) -> Optional[Fraction]:
        """A timestamp in stream time base as seconds from the origin."""
        return None if pts is None else pts * self.time_base - self.origin_s

    def check_deadline(self) -> None:
        """MediaError once the call has run longer than ``timeout_s``."""
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise MediaError(self.path, f"decoding took longer than timeout_s={self.timeout_s} s; "
                                        "pass a larger timeout_s, or check the file is not damaged")

    def note(self, packet: av.Packet) -> None:
        """Account for a demuxed packet of this stream in ``end_s`` (and check the deadline)."""
        self.check_deadline()
        pts = packet.pts
        if pts is None:
            return
        duration = packet.duration
        if duration:
            end_pts = pts + duration
            self._end_pts = end_pts if self._end_pts is None else max(self._end_pts, end_pts)
            return
        self.durations_known = False
        packet_end_s = self.seconds(pts) + self.fallback_duration_s
        self._fallback_end_s = packet_end_s if self._fallback_end_s is None else max(self._fallback_end_s, packet_end_s)

    def is_shown(self, packet: av.Packet) -> bool:
        """Whether the packet's frame is on the timeline (not before time 0, not discarded)."""
        return packet.pts is not None and not packet.is_discard and self.seconds(packet.pts) >= 0

    def packets(self) -> Iterator[av.Packet]:
        """The stream's packets from the current position (the last one is the decoder flush)."""
        for packet in self.container.demux(self.stream):
            self.note(packet)
            yield packet
        self.check_complete()

    def check_complete(self) -> None:
        """At the end of the file: MediaError when packets stop well before the stream's indexed
        duration (a truncated download whose index survived, e.g. an mp4 with faststart)."""
        formats = set(self.container.format.name.split(","))
        seeked_past_the_end = self.end_s is None and self._seeked
        if not formats & _INDEXED_FORMATS or self.stream.duration is None or seeked_past_the_end:
            return
        indexed_end_s = self.seconds((self.stream.start_time or 0) + self.stream.duration)
        tolerance_s = max(_TRUNCATION_TOLERANCE_S, 2 * self.fallback_duration_s)
        if (self.end_s or 0) < indexed_end_s - tolerance_s:
            raise MediaError(self.path, f"the file is truncated: its {self.stream.type} data ends at "
                                        f"{float(self.end_s or 0):.3f} s but its index says "
                                        f"{float(indexed_end_s):.3f} s; the file was not copied or "
                                        "written completely, fetch or create it again")

    def frames(self) -> Iterator[Tuple[av.frame.Frame, Optional[Fraction]]]:
        """Decoded frames with their time (seconds from the origin) in presentation order."""
        for packet in self.packets():
            for frame in packet.decode():
                self.check_deadline()
                yield frame, self.seconds(frame.pts)

    def frames_from(self, need_s: Fraction) -> Iterator[Tuple[av.frame.Frame, Optional[Fraction]]]:
        """Decoded frames, the first at or before ``need_s`` (or the stream's first frame).

        Seeks backward to a keyframe before ``need_s`` instead of decoding from the start;
        a seek that lands too late (keyframe indexes by decode time) or past the last frame is
        retried further back.
        """
        lead_s = _SEEK_LEAD_S
        while True:
            target_s = need_s - lead_s
            if target_s > 0:
                self._seek(target_s)
            elif self._seeked:
                self._seek(Fraction(0))
            decoded = self.frames()
            first = next(decoded, None)
            if target_s <= 0 or (first is not None and (first[1] is None or first[1] <= need_s)):
                if first is None:
                    return
                yield first
                yield from decoded
                return
            lead_s *= _SEEK_LEAD_GROWTH

    def _seek(self, time_s: Fraction) -> None:
        start = self.stream.start_time or 0
        offset = math.floor((time_s + self.origin_s) / self.time_base)
        self.container.seek(max(start, offset), backward=True, any_frame=False, stream=self.stream)
        self._seeked = True


# ----------------------------------------------------------------------------- video


def _frames_in_window(timed_frames, start_s: Fraction, end_s: Optional[Fraction]):
    """The stream's own frames whose time lies in [start_s, end_s)."""
    for frame, time_s in timed_frames:
        if end_s is not None and time_s >= end_s:
            return
        if time_s >= start_s:
            yield frame


def _frames_at_rate(timed_frames, start_s: Fraction, fps: Fraction, max_frames: Optional[int],
                    stream_end_s: Callable[[], Optional[Fraction]]):
    """For k = 0, 1, ...: the latest frame whose time <= start_s + k / fps (the first frame
    when none is), while that time is before the stream's end and k < max_frames."""
    k = 0
    shown = None
    for frame, time_s in timed_frames:
        while (max_frames is None or k < max_frames) and start_s + k / fps < time_s:
            yield frame if shown is None else shown
            k += 1
        if max_frames is not None and k >= max_frames:
            return
        shown = frame
    end_s = stream_end_s()
    while shown is not None and (max_frames is None or k < max_frames) and start_s + k / fps < end_s:
        yield shown
        k += 1


def _timed_video_frames(reader: _StreamReader, start_s: Fraction):
    """Decoded frames with times from ``start_s`` on (a few before it); MediaError without pts."""
    for frame, time_s in reader.frames_from(start_s):
        if time_s is None:
            raise MediaError(reader.path, "a video frame has no timestamp; remux the file, e.g. "
                                          "`ffmpeg -i FILE -c copy OUT.mp4`")
        yield frame, time_s


def _frame_duration_s(stream) -> Fraction:
    """Nominal seconds per frame of a video stream (0 when the stream does not say)."""
    rate = stream.average_rate or stream.guessed_rate
    return 1 / Fraction(rate) if rate else Fraction(0)


def _video_reader(container, path, timeout_s) -> _StreamReader:
    stream = _video_stream(container, path)
    stream.thread_type = "AUTO"
    return _StreamReader(container, stream, path, timeout_s,
                         fallback_duration_s=_frame_duration_s(stream))


def read_video(path, start_s=0.0, duration_s=None, fps=None, gray=False, size=None,
               timeout_s=60.0) -> np.ndarray:
    """Frames of ``path`` in the window [start_s, start_s + duration_s) (to the end when None).

    fps=None returns the stream's own frames whose timestamps lie in the window. With a rate,
    output frame k shows time ``start_s + k / fps``: the latest frame whose timestamp is
    <= that time (the first frame when none is); there are ``round(duration_s * fps)``
    frames, fewer when the stream ends first.

    Args:
        size: (H, W) to resize to, or None for the stored size.
        gray: return luma only.
        timeout_s: seconds the decode may take before MediaError (None: no limit).
    Returns:
        uint8 array (T, H, W, 3) RGB, or (T, H, W) when ``gray``.
    """
    start = _exact(start_s, "start_s")
    window_end = None if duration_s is None else start + _exact(duration_s, "duration_s")
    rate = None if fps is None else _positive_rate(fps, "fps")
    with _open_input(path) as container:
        reader = _video_reader(container, path, timeout_s)
        height, width = size if size is not None else (reader.stream.codec_context.height,
                                                       reader.stream.codec_context.width)
        timed_frames = _timed_video_frames(reader, start)
        max_frames = None
        if rate is None:
            chosen = _frames_in_window(timed_frames, start, window_end)
        else:
            max_frames = None if duration_s is None else round(float(duration_s) * float(rate))
            chosen = _frames_at_rate(timed_frames, start, rate, max_frames, lambda: reader.end_s)
        return _frames_to_array(chosen, gray, height, width, path, expected_frames=max_frames)


def _frames_to_array(frames, gray: bool, height: int, width: int, path,
                     expected_frames: Optional[int] = None) -> np.ndarray:
    """Convert frames to uint8 (T, H, W, 3) RGB or (T, H, W) luma, once per distinct frame;
    MediaError before they pass :data:`MAX_DECODED_BYTES`.

    Each image is written into one array allocated for ``expected_frames`` (grown when more
    come) instead of being stacked from a list at the end: no second copy of the clip, and no
    heap left fragmented by hundreds of frame-sized arrays.
    """
    # One single-threaded scaler for the whole call: a new multi-threaded swscale context
    # per frame (to_ndarray's default) costs ~30x the conversion of a small frame.
    reformatter = VideoReformatter()
    frame_shape = (height, width) if gray else (height, width, 3)
    frame_bytes = math.prod(frame_shape)
    capacity = max(1, min(expected_frames or 64, MAX_DECODED_BYTES // frame_bytes + 1))
    images = np.empty((capacity, *frame_shape), np.uint8)
    count = 0
    last_frame = None
    for frame in frames:
        if (count + 1) * frame_bytes > MAX_DECODED_BYTES:
            raise MediaError(path, f"more than {MAX_DECODED_BYTES / 2**30:g} GiB of decoded {width}x{height} "
                                   "frames (W x H); read a shorter window or scale the frames while "
                                   "decoding (size=, e.g. the tasks' image_size / resize_short_side)")
        if count == len(images):
            images = np.concatenate([images, np.empty_like(images)])
        if frame is last_frame:
            images[count] = images[count - 1]
        else:
            last_frame = frame
            images[count] = reformatter.reformat(frame, format="gray" if gray else "rgb24", width=width,
                                                 height=height, threads=1).to_ndarray()
        count += 1
    return images if count == len(images) else images[:count].copy()


def count_video_frames(path, fps=25.0, timeout_s=60.0) -> int:
    """Frames ``read_video(path, fps=fps)`` returns, from packet timestamps (no decoding).

    fps=None counts the stream's own frames from the origin on.
    """
    rate = None if fps is None else _positive_rate(fps, "fps")
    with _open_input(path) as container:
        reader = _video_reader(container, path, timeout_s)
        num_frames = sum(1 for packet in reader.packets() if reader.is_shown(packet))
    if rate is None:
        return num_frames
    if num_frames == 0 or reader.end_s is None or reader.end_s <= 0:
        return 0
    return math.ceil(reader.end_s * rate)


# ----------------------------------------------------------------------------- audio


def _frame_to_mono(frame: av.AudioFrame) -> np.ndarray:
    """The average of a decoded frame's channels as float32 (samples,) in [-1, 1]."""
    data = frame.to_ndarray()
    num_channels = len(frame.layout.channels)
    if num_channels == 1 and frame.format.name in ("s16", "s16p"):
        # int16 / 2**15 is exact in float32: the float64 path below gives the same values
        return data.reshape(-1).astype(np.float32) / np.float32(32768.0)
    if not frame.format.is_planar:
        data = data.reshape(-1, num_channels).T
    name = frame.format.name.rstrip("p")
    if name == "u8":
        data = (data.astype(np.float32) - 128.0) / 128.0
    elif name in ("s16", "s32", "s64"):
        data = data.astype(np.float64) / float(2 ** (8 * data.dtype.itemsize - 1))
    return data.mean(axis=0).astype(np.float32)


def _decode_native_audio(reader: _StreamReader, sample_rate: int, first: int, stop: Optional[int]
                         ) -> Tuple[np.ndarray, bool]:
    """Mono native-rate samples ``first, first + 1, ...`` of the stream's timeline.

    Samples are placed by frame timestamps: a gap longer than the tolerance becomes silence,
    an overlap is dropped, samples before ``first`` (and before time 0) are dropped.
    Decoding stops once ``stop`` is reached (None: the end).

    Returns:
        (samples float32 (n,), reached_end): at the end, samples past the last packet's end
        (encoder padding of the final frame) are cut.
    """
    tolerance = math.ceil(_AUDIO_GAP_TOLERANCE_S * sample_rate)
    chunks: List[np.ndarray] = []
    cursor = first          # absolute index of the next sample to append
    expected = None         # absolute index where the next frame continues the previous one
    need_s = Fraction(first, sample_rate) - _AUDIO_DECODER_WARMUP_S
    for frame, time_s in reader.frames_from(need_s):
        samples = _frame_to_mono(frame)
        if not np.isfinite(samples).all():
            where = "" if time_s is None else f" near {float(time_s):.3f} s"
            raise MediaError(reader.path, f"the audio has NaN or infinite samples{where}; it was written from "
                                          "broken data, create it again")
        index = expected if time_s is None else round(time_s * sample_rate)
        if expected is not None and abs(index - expected) <= tolerance:
            index = expected
        expected = index + len(samples)
        if index > cursor:
            chunks.append(np.zeros(index - cursor, np.float32))
        chunks.append(samples[max(0, cursor - index):])
        cursor = max(cursor, expected)
        if stop is not None and cursor >= stop:
            return np.concatenate(chunks), False
    samples = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    if reader.durations_known and reader.end_s is not None:
        samples = samples[:max(0, round(reader.end_s * sample_rate) - first)]
    return samples, True


def _resample(samples: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Resample mono float32 samples with libswresample; sample 0 stays at time 0.

    Returns about ``len(samples) * rate_out / rate_in`` samples (the filter tail flushed).
    """
    if rate_in == rate_out or len(samples) == 0:
        return samples
    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate_out)
    frame = av.AudioFrame.from_ndarray(samples[None, :], format="flt", layout="mono")
    frame.sample_rate = rate_in
    frames = resampler.resample(frame) + resampler.resample(None)
    return np.concatenate([f.to_ndarray().reshape(-1) for f in frames]).astype(np.float32)


def _fit_length(samples: np.ndarray, length: int) -> np.ndarray:
    """Cut or zero-pad the tail of ``samples`` to ``length``."""
    if len(samples) >= length:
        return samples[:length]
    return np.concatenate([samples, np.zeros(length - len(samples), np.float32)])


def _audio_reader(container, path, timeout_s) -> Tuple[_StreamReader, int]:
    stream = _audio_stream(container, path)
    stream.thread_type = "AUTO"
    rate = stream.codec_context.sample_rate
    if not rate:
        raise MediaError(path, "the audio stream has no sample rate; " + _HINT_CORRUPT)
    return _StreamReader(container, stream, path, timeout_s), rate


def read_audio(path, start_s=0.0, duration_s=None, sample_rate=16000, timeout_s=60.0) -> np.ndarray:
    """Mono audio of ``path`` at ``sample_rate`` (channels averaged), sample-exact.

    Returns the samples ``round(start_s * sample_rate)`` ... of the resampled stream,
    ``round(duration_s * sample_rate)`` of them (fewer at the end; to the end when None).

    Returns:
        float32 array (N,) in [-1, 1].
    """
    rate_out = int(_positive_rate(sample_rate, "sample_rate"))
    first_out = round(_exact(start_s, "start_s") * rate_out)
    num_out = None if duration_s is None else round(_exact(duration_s, "duration_s") * rate_out)
    with _open_input(path) as container:
        reader, rate_in = _audio_reader(container, path, timeout_s)
        # Native samples are decoded from a multiple of `grid`, where both sample clocks meet,
        # so that a windowed read resamples on the same phase as a full read.
        grid = rate_in // math.gcd(rate_in, rate_out)
        context = math.ceil(_RESAMPLER_CONTEXT_S * rate_in)
        first_in = max(0, (first_out * rate_in // rate_out - context) // grid * grid)
        stop_in = None if num_out is None else -(-(first_out + num_out) * rate_in // rate_out) + context
        native, reached_end = _decode_native_audio(reader, rate_in, first_in, stop_in)
    first_in_out = first_in * rate_out // rate_in
    resampled = _resample(native, rate_in, rate_out)
    if reached_end:
        total_out = round((first_in + len(native)) * rate_out / rate_in)
        resampled = _fit_length(resampled, total_out - first_in_out)
    window = resampled[first_out - first_in_out:]
    if num_out is not None:
        window = window[:num_out]
    return np.clip(window, -1.0, 1.0)


def count_audio_samples(path, sample_rate=16000, timeout_s=60.0) -> int:
    """Samples ``read_audio(path, sample_rate=sample_rate)`` returns (decodes, no resampling)."""
    rate_out = int(_positive_rate(sample_rate, "sample_rate"))
    with _open_input(path) as container:
        reader, rate_in = _audio_reader(container, path, timeout_s)
        native, _ = _decode_native_audio(reader, rate_in, 0, None)
    return round(len(native) * rate_out / rate_in)


# ----------------------------------------------------------------------------- probing


def _count_packets(container, streams, path, timeout_s) -> dict:
    """One demux pass over ``streams``: {stream index: (shown packets, end seconds from origin)}."""
    readers = {stream.index: _StreamReader(container, stream, path, timeout_s) for stream in streams}
    counts = dict.fromkeys(readers, 0)
    for packet in container.demux(*streams):
        reader = readers[packet.stream.index]
        reader.note(packet)
        counts[packet.stream.index] += reader.is_shown(packet)
    for reader in readers.values():
        reader.check_complete()
    return {index: (counts[index], readers[index].end_s or Fraction(0)) for index in readers}


def probe(path, timeout_s=60.0) -> MediaInfo:
    """Read the streams' metadata of ``path``; counts missing from it come from a demux pass."""
    with _open_input(path) as container:
        video = _video_stream(container)
        audio = _audio_stream(container)
        if video is None and audio is None:
            raise MediaError(path, "has neither an audio nor a video stream; pass a media file")
        uncounted = [s for s in (video,) if s is not None and not s.frames]
        uncounted += [s for s in (audio,) if s is not None and not s.duration]
        summary = _count_packets(container, uncounted, path, timeout_s) if uncounted else {}
        num_video_frames = num_audio_samples = None
        if video is not None:
            num_video_frames = video.frames or summary[video.index][0]
        if audio is not None:
            rate = audio.codec_context.sample_rate
            audio_s = audio.duration * audio.time_base if audio.duration else summary[audio.index][1]
            num_audio_samples = round(audio_s * rate)
        if container.duration is not None:
            duration_s = container.duration / av.time_base
        else:
            duration_s = float(max((end for _, end in summary.values()), default=0))
        return MediaInfo(
            path=os.fspath(path),
            has_video=video is not None,
            has_audio=audio is not None,
            video_fps=float(video.average_rate) if video is not None and video.average_rate else None,
            num_video_frames=num_video_frames,
            width=video.codec_context.width if video is not None else None,
            height=video.codec_context.height if video is not None else None,
            audio_sample_rate=audio.codec_context.sample_rate if audio is not None else None,
            audio_channels=len(audio.codec_context.layout.channels) if audio is not None else None,
            num_audio_samples=num_audio_samples,
            duration_s=float(duration_s),
        )


# ----------------------------------------------------------------------------- writing


def _check_frames(frames) -> np.ndarray:
    """Validate frames for yuv420p encoding: uint8 (T, H, W, 3) or (T, H, W), even H and W."""
    frames = np.asarray(frames)
    rgb_or_gray = frames.ndim == 3 or (frames.ndim == 4 and frames.shape[-1] == 3)
    if frames.dtype != np.uint8 or not rgb_or_gray:
        raise ValueError(f"frames must be uint8 (T, H, W, 3) RGB or (T, H, W) gray, got "
                         f"{frames.dtype} {frames.shape}; convert with np.clip(x, 0, 255).astype(np.uint8)")
    if len(frames) == 0:
        raise ValueError("frames is empty; pass at least one frame")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"frames are {height}x{width} (H x W); yuv420p needs even sizes, "
                         "crop or pad one pixel")
    return frames


def _check_mono(samples, name: str) -> np.ndarray:
    """Validate mono audio: a 1-D float array, returned as float32 clipped to [-1, 1]."""
    samples = np.asarray(samples)
    if samples.ndim != 1 or not np.issubdtype(samples.dtype, np.floating):
        raise ValueError(f"{name} must be float (N,) mono in [-1, 1], got {samples.dtype} "
                         f"{samples.shape}; average the channels first")
    return np.clip(samples.astype(np.float32), -1.0, 1.0)


def _default_video_codec() -> str:
    """H.264 (libx264) when the PyAV wheel has it, else MPEG-4 part 2."""
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def _audio_frame(samples: np.ndarray, sample_rate: int, first_sample: int) -> av.AudioFrame:
    """A mono float frame of ``samples`` starting at sample ``first_sample``."""
    frame = av.AudioFrame.from_ndarray(samples[None, :], format="flt", layout="mono")
    frame.sample_rate = sample_rate
    frame.pts = first_sample
    frame.time_base = Fraction(1, sample_rate)
    return frame


def write_video(path, frames, fps, audio=None, sample_rate=16000, video_codec=None, crf=18,
                keyframe_interval_s=1.0) -> None:
    """Write an mp4: frames at ``fps`` (yuv420p) and, when given, AAC audio.

    Args:
        frames: uint8 (T, H, W, 3) RGB or (T, H, W) gray; H and W even.
        fps: frame rate (frames per second).
        audio: float32 (N,) mono in [-1, 1] at ``sample_rate`` Hz, starting with frame 0.
        video_codec: FFmpeg encoder name; default libx264 when the wheel has it, else mpeg4.
        crf: libx264 constant rate factor (lower is better quality).
        keyframe_interval_s: seconds between keyframes at most, so that windowed reads
            seek close to their start instead of decoding from the beginning.
    """
    frames = _check_frames(frames)
    rate = _positive_rate(fps, "fps")
    audio = None if audio is None else _check_mono(audio, "audio")
    codec = video_codec or _default_video_codec()
    with _converted_errors(path), av.open(os.fspath(path), mode="w", format="mp4") as container:
        video_stream = container.add_stream(codec, rate=rate)
        video_stream.width, video_stream.height = frames.shape[2], frames.shape[1]
        video_stream.pix_fmt = "yuv420p"
        video_stream.codec_context.gop_size = max(1, round(keyframe_interval_s * rate))
        if codec == "libx264":
            # mbtree's lookahead makes x264's bits vary from run to run; without it equal frames
            # encode to equal files, which corpus determinism relies on
            video_stream.options = {"crf": str(crf), "mbtree": "0"}
        else:
            video_stream.codec_context.qscale = 2  # near-lossless fixed quantiser for mpeg4
        audio_stream = None
        if audio is not None:
            audio_stream = container.add_stream("aac", rate=int(sample_rate), layout="mono")
        written = 0  # audio samples encoded so far, kept up with the video for interleaving
        for index, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image),
                                               format="gray" if image.ndim == 2 else "rgb24")
            frame.pts = index
            container.mux(video_stream.encode(frame))
            if audio_stream is not None:
                until = min(len(audio), round((index + 1) / rate * sample_rate))
                if until > written:
                    chunk = _audio_frame(audio[written:until], sample_rate, written)
                    container.mux(audio_stream.encode(chunk))
                    written = until
        container.mux(video_stream.encode(None))
        if audio_stream is not None:
            if written < len(audio):
                container.mux(audio_stream.encode(_audio_frame(audio[written:], sample_rate, written)))
            container.mux(audio_stream.encode(None))


def write_audio(path, samples, sample_rate=16000) -> None:
    """Write float32 (N,) mono samples in [-1, 1] as a 16-bit PCM wav at ``sample_rate`` Hz."""
    samples = _check_mono(samples, "samples")
    pcm = np.clip(np.round(samples * _PCM_SCALE), -_PCM_SCALE, _PCM_SCALE - 1).astype(np.int16)
    with _converted_errors(path), av.open(os.fspath(path), mode="w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=int(sample_rate), layout="mono")
        frame = av.AudioFrame.from_ndarray(pcm[None, :], format="s16", layout="mono")
        frame.sample_rate = int(sample_rate)
        frame.pts = 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


# --- remuxing with a shifted audio track (avsync predict --fix) ----------------------------
_DEFAULT_LAYOUTS = {1: "mono", 2: "stereo", 3: "2.1", 4: "4.0", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}


def _encodable_layout(layout: av.AudioLayout) -> str:
    """The layout's name, or the default layout of its channel count when it has none."""
    if layout.name.endswith(" channels"):
        return _DEFAULT_LAYOUTS.get(len(layout.channels), layout.name)
    return layout.name


class _ShiftedAudioEncoder:
    """Re-encodes decoded audio ``delay_samples`` later on the output's timeline (silence
    before, samples that land before 0 dropped), at the input's rate and channel layout.

    Decoders return whole codec frames; the stream's packets say where it really ends (an AAC
    encoder pads the last frame), so the newest chunk is held back until the end is known.
    """

    def __init__(self, container, stream, delay_samples: int, origin_s: Fraction):
        self.container = container
        self.stream = stream
        self.rate = stream.codec_context.sample_rate
        self.layout = stream.codec_context.layout.name
        self.channels = len(stream.codec_context.layout.channels)
        self.delay_samples = delay_samples
        self.origin_s = origin_s
        self.converter = av.AudioResampler(format="fltp", layout=self.layout, rate=self.rate)
        self.next_index: Optional[int] = None  # output sample index of the next decoded sample
        self.pending: Optional[Tuple[int, np.ndarray]] = None  # (start index, (channels, n) samples)
        self.end_s: Optional[Fraction] = Fraction(0)  # input end from packets; None: unknown

    def note_packet(self, packet: av.Packet) -> None:
        """Track where the input's audio ends (seconds from the origin)."""
        if packet.pts is None or self.end_s is None:
            return
        if not packet.duration:
            self.end_s = None
            return
        self.end_s = max(self.end_s, (packet.pts + packet.duration) * packet.time_base - self.origin_s)

    def push(self, frame: av.AudioFrame) -> None:
        """Add a decoded frame; the first one fixes the placement, the rest follow contiguously."""
        if self.next_index is None:
            time_s = Fraction(0) if frame.pts is None else frame.pts * frame.time_base - self.origin_s
            first = round(time_s * self.rate) + self.delay_samples
            self.next_index = min(first, 0)
            self._queue(np.zeros((self.channels, max(first, 0)), np.float32))
        for converted in self.converter.resample(frame):
            self._queue(converted.to_ndarray())

    def finish(self) -> None:
        """Encode what is held back, cut at the input's end, and flush the encoder."""
        if self.pending is not None:
            start, planar = self.pending
            if self.end_s is not None:
                planar = planar[:, : max(0, round(self.end_s * self.rate) + self.delay_samples - start)]
            self._encode(start, planar)
        self.container.mux(self.stream.encode(None))

    def _queue(self, planar: np.ndarray) -> None:
        if self.pending is not None:
            self._encode(*self.pending)
        self.pending = (self.next_index, planar)
        self.next_index += planar.shape[1]

    def _encode(self, start: int, planar: np.ndarray) -> None:
        """Encode (channels, n) float samples placed at output index ``start``."""
        planar = planar[:, max(0, -start):]
        if planar.shape[1] == 0:
            return
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(planar, np.float32), format="fltp", layout=self.layout)
        frame.sample_rate = self.rate
        frame.pts = max(start, 0)
        frame.time_base = Fraction(1, self.rate)
        self.container.mux(self.stream.encode(frame))


def _copy_or_reencode_video(out, video_in, origin_s: Fraction):
    """Add the output video stream; return a function muxing one input packet into it (None:
    the end). Packets are copied with their timestamps moved to the new origin when the output
    container takes the codec, otherwise decoded and re-encoded (frames numbered at the
    stream's average rate)."""
    if video_in.codec_context.name in out.supported_codecs:
        video_out = out.add_stream_from_template(video_in)
        shift = math.floor(origin_s / video_in.time_base)

        def mux(packet):
            if packet is None or packet.dts is None:  # the end / the demuxer's final empty packet
                return
            packet.pts = None if packet.pts is None else packet.pts - shift
            packet.dts -= shift
            packet.stream = video_out
            out.mux(packet)

        return mux
    rate = Fraction(video_in.average_rate or video_in.guessed_rate or 25)
    video_out = out.add_stream(out.default_video_codec, rate=rate)
    video_out.width, video_out.height = video_in.codec_context.width, video_in.codec_context.height
    video_out.pix_fmt = "yuv420p"
    frame_numbers = itertools.count()

    def mux(packet):
        for frame in packet.decode() if packet is not None else []:
            frame = frame.reformat(format="yuv420p")
            frame.pts, frame.time_base = next(frame_numbers), 1 / rate
            out.mux(video_out.encode(frame))
        if packet is None:
            out.mux(video_out.encode(None))

    return mux


def _demuxed(inp, video_in, audio_in, source: str):
    """(packet, its decoded frames for audio / [] for video) in file order; FFmpeg errors while
    reading name ``source`` (those while writing name the output)."""
    with _converted_errors(source):
        for packet in inp.demux(video_in, audio_in):
            yield packet, packet.decode() if packet.stream.index == audio_in.index else []


def write_shifted_copy(source: str, destination: str, delay_s: float) -> None:
    """Copy ``source`` to ``destination`` with the audio delayed by ``delay_s`` seconds
    (negative: advanced): output audio at time t is input audio at time t - delay_s, silence
    before the input's first sample, input samples that would land before 0 dropped.

    To undo an offset estimate ``e`` (audio early by ``e``), pass ``delay_s=e``. The video
    packets are copied without re-encoding when the output container takes the codec; the
    audio is re-encoded as AAC at its own sample rate and channel layout. The file is written
    to a temporary name beside ``destination`` and renamed when complete.

    Raises:
        avplugins.data.MediaError: unreadable input, no audio or video stream, or an
            output FFmpeg cannot write (e.g. an unknown extension).
        ValueError: ``destination`` is the input file, or its folder does not exist.
    """
    source, destination = os.fspath(source), os.fspath(destination)
    if os.path.abspath(source) == os.path.abspath(destination):
        raise ValueError(f"{destination}: the corrected copy would overwrite its input; choose another path")
    folder = os.path.dirname(os.path.abspath(destination))
    if not os.path.isdir(folder):
        raise ValueError(f"{destination}: the folder {folder} does not exist; create it first")
    extension = os.path.splitext(destination)[1]
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(destination)}.", suffix=extension)
    os.close(handle)
    try:
        with _open_input(source) as inp:
            video_in = _video_stream(inp, source)
            audio_in = _audio_stream(inp, source)
            origin_s = _timeline_origin(inp)
            try:
                out = av.open(temporary, mode="w")
            except ValueError as error:  # PyAV: unknown extension
                raise MediaError(destination, f"{error}; use a known extension such as .mp4 or .mkv") from None
            with _converted_errors(destination), out:
                mux_video = _copy_or_reencode_video(out, video_in, origin_s)
                audio_out = out.add_stream("aac", rate=audio_in.codec_context.sample_rate,
                                           layout=_encodable_layout(audio_in.codec_context.layout))
                audio = _ShiftedAudioEncoder(out, audio_out, round(delay_s * audio_out.codec_context.sample_rate),
                                             origin_s)
                for packet, audio_frames in _demuxed(inp, video_in, audio_in, source):
                    if packet.stream.index == video_in.index:
                        mux_video(packet)
                    else:
                        audio.note_packet(packet)
                        for frame in audio_frames:
                            audio.push(frame)
                mux_video(None)
                audio.finish()
        os.replace(temporary, destination)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
