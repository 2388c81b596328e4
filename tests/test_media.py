"""Tests of avplugins.data.media: real files written and read back through PyAV/FFmpeg."""
from fractions import Fraction

import av
import numpy as np
import pytest

from avplugins.data import media
from avplugins.data.media import (
    MediaError,
    count_audio_samples,
    count_video_frames,
    probe,
    read_audio,
    read_video,
    write_audio,
    write_video,
)

HEIGHT, WIDTH = 48, 64
FPS = 25
SAMPLE_RATE = 16000
CLICK_FRAME = 40
LEVEL_STEP = 3  # grey level per frame index, so a decoded frame's mean tells its index


def _indexed_frames(num_frames: int, white=()) -> np.ndarray:
    """uint8 (T, H, W, 3) flat grey frames of level LEVEL_STEP * index; `white` ones at 255."""
    levels = (np.arange(num_frames) * LEVEL_STEP).astype(np.uint8)
    levels[list(white)] = 255
    return np.broadcast_to(levels[:, None, None, None], (num_frames, HEIGHT, WIDTH, 3)).copy()


def _frame_indices(video: np.ndarray) -> np.ndarray:
    """The index each decoded frame of `_indexed_frames` shows (T,)."""
    return np.round(video.reshape(len(video), -1).mean(axis=1) / LEVEL_STEP).astype(int)


def _sine(freq_hz: float, num_samples: int, sample_rate: int, amplitude: float = 1.0) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * freq_hz * np.arange(num_samples) / sample_rate)).astype(np.float32)


def _write_pcm_wav(path, channels: np.ndarray, sample_rate: int, layout: str) -> None:
    """Independent multi-channel wav writer: float (C, N) -> interleaved 16-bit PCM."""
    interleaved = np.round(channels.T * 32767).astype(np.int16).reshape(1, -1)
    with av.open(str(path), "w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=sample_rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(interleaved, format="s16", layout=layout)
        frame.sample_rate = sample_rate
        frame.pts = 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _write_timed_video(path, times_ms, end_ms, audio_rate=None) -> None:
    """A variable-frame-rate H.264 mp4: frame i (grey level LEVEL_STEP * i) shown from times_ms[i].

    No B-frames, and each packet carries its display duration: mp4 stores durations as decode
    time steps, so only then do they equal the display times. With `audio_rate`, a silent AAC
    track from time 0 is added.
    """
    durations = dict(zip(times_ms, np.diff(list(times_ms) + [end_ms])))
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", options={"bf": "0"})
        stream.codec_context.time_base = Fraction(1, 1000)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        audio_stream = None
        if audio_rate is not None:
            audio_stream = container.add_stream("aac", rate=audio_rate, layout="mono")

        def mux(packets):
            for packet in packets:
                packet.duration = int(durations[packet.pts])
                container.mux(packet)

        for index, start in enumerate(times_ms):
            frame = av.VideoFrame.from_ndarray(_indexed_frames(index + 1)[-1], format="rgb24")
            frame.pts, frame.time_base = int(start), Fraction(1, 1000)
            mux(stream.encode(frame))
        mux(stream.encode(None))
        if audio_stream is not None:
            silence = av.AudioFrame.from_ndarray(np.zeros((1, audio_rate * end_ms // 1000), np.float32),
                                                 format="flt", layout="mono")
            silence.sample_rate, silence.pts, silence.time_base = audio_rate, 0, Fraction(1, audio_rate)
            container.mux(audio_stream.encode(silence))
            container.mux(audio_stream.encode(None))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """3 s at 25 fps, frame 40 white; audio: a sine, noise and a click at exactly 40 / 25 s."""
    path = tmp_path_factory.mktemp("media") / "clip.mp4"
    rng = np.random.default_rng(0)
    num_samples = 3 * SAMPLE_RATE
    noise = rng.uniform(-0.02, 0.02, num_samples).astype(np.float32)
    audio = _sine(440, num_samples, SAMPLE_RATE, 0.2) + noise
    audio[CLICK_FRAME * SAMPLE_RATE // FPS] = 0.95
    frames = _indexed_frames(3 * FPS, white=[CLICK_FRAME])
    write_video(path, frames, FPS, audio=audio, sample_rate=SAMPLE_RATE)
    return path, frames, audio


@pytest.fixture(scope="module")
def clip_30fps(tmp_path_factory):
    """2 s at 30 fps (60 index-coded frames), video only, a keyframe every 0.5 s."""
    path = tmp_path_factory.mktemp("media") / "clip30.mp4"
    write_video(path, _indexed_frames(60), 30, keyframe_interval_s=0.5)
    return path


@pytest.fixture(scope="module")
def stereo_wav(tmp_path_factory):
    """1 s at 44.1 kHz: left a 440 Hz sine of amplitude 0.8, right silence."""
    path = tmp_path_factory.mktemp("media") / "stereo.wav"
    left = _sine(440, 44100, 44100, 0.8)
    _write_pcm_wav(path, np.stack([left, np.zeros_like(left)]), 44100, "stereo")
    return path


# ----------------------------------------------------------------------------- counts and timing


def test_probe_and_counts_of_written_clip(clip):
    path, frames, audio = clip
    info = probe(path)
    assert (info.has_video, info.has_audio) == (True, True)
    assert info.video_fps == pytest.approx(25.0)
    assert info.num_video_frames == 75
    assert (info.width, info.height) == (WIDTH, HEIGHT)
    assert (info.audio_sample_rate, info.audio_channels) == (SAMPLE_RATE, 1)
    assert info.num_audio_samples == len(audio)
    assert info.duration_s == pytest.approx(3.0, abs=0.05)
    video = read_video(path)
    assert video.shape == (75, HEIGHT, WIDTH, 3) and video.dtype == np.uint8
    assert np.array_equal(_frame_indices(video)[:CLICK_FRAME], np.arange(CLICK_FRAME))
    assert count_video_frames(path) == count_video_frames(path, fps=None) == 75
    assert len(read_video(path, fps=25)) == 75
    # the AAC encoder pads its last frame; the reader cuts at the stream's end
    decoded = read_audio(path)
    assert decoded.dtype == np.float32 and decoded.shape == (len(audio),)
    assert count_audio_samples(path) == len(audio)
    assert count_audio_samples(path, sample_rate=8000) == len(read_audio(path, sample_rate=8000)) == 24000


@pytest.mark.parametrize("audio_rate", [16000, 48000])
def test_click_is_heard_when_the_white_frame_is_seen(tmp_path, audio_rate):
    """AAC priming must be trimmed: the decoded click lines up with the white frame."""
    path = tmp_path / "sync.mp4"
    audio = np.zeros(3 * audio_rate, np.float32)
    audio[CLICK_FRAME * audio_rate // FPS] = 0.9
    write_video(path, _indexed_frames(75, white=[CLICK_FRAME]), FPS, audio=audio, sample_rate=audio_rate)
    white_s = np.argmax(read_video(path, fps=FPS).mean(axis=(1, 2, 3))) / FPS
    decoded = read_audio(path, sample_rate=SAMPLE_RATE)
    click_s = np.argmax(np.abs(decoded)) / SAMPLE_RATE
    assert white_s == CLICK_FRAME / FPS
    assert abs(click_s - white_s) < 1 / FPS
    # measured with this PyAV/FFmpeg: the offset is below one output sample
    assert abs(click_s - white_s) <= 1 / SAMPLE_RATE
    # the same holds inside windows (seeked reads)
    window = read_audio(path, start_s=1.0, duration_s=1.0)
    assert abs(np.argmax(np.abs(window)) / SAMPLE_RATE + 1.0 - white_s) <= 1 / SAMPLE_RATE
    assert np.argmax(read_video(path, start_s=1.0, duration_s=1.0, fps=FPS).mean(axis=(1, 2, 3))) == 15


def test_30fps_resampled_by_timestamp(clip_30fps):
    video = read_video(clip_30fps, fps=25)
    assert len(video) == round(2.0 * 25) == count_video_frames(clip_30fps, fps=25)
    # output frame k shows time k / 25: the latest 30 fps frame j with j / 30 <= k / 25
    assert np.array_equal(_frame_indices(video), np.arange(50) * 6 // 5)
    assert len(read_video(clip_30fps)) == 60 == count_video_frames(clip_30fps, fps=None)
    upsampled = read_video(clip_30fps, fps=50)
    assert np.array_equal(_frame_indices(upsampled), np.arange(100) * 3 // 5)


def test_variable_frame_rate_resampled_by_timestamp(tmp_path):
    path = tmp_path / "vfr.mp4"
    rng = np.random.default_rng(1)
    times_ms = np.concatenate([[0], np.cumsum(rng.integers(10, 90, size=59))])
    _write_timed_video(path, times_ms, end_ms=3000)
    video = read_video(path, fps=25)
    assert len(video) == round(3.0 * 25) == count_video_frames(path, fps=25)
    oracle = np.searchsorted(times_ms / 1000, np.arange(75) / 25, side="right") - 1
    assert np.array_equal(_frame_indices(video), oracle)
    assert np.array_equal(_frame_indices(read_video(path)), np.arange(60))
    assert count_video_frames(path, fps=None) == probe(path).num_video_frames == 60


def test_video_starting_after_the_audio_repeats_its_first_frame(tmp_path):
    """Time 0 is where the audio starts; output frames before the first video frame show it."""
    path = tmp_path / "late.mp4"
    _write_timed_video(path, [100, 140, 180], end_ms=220, audio_rate=SAMPLE_RATE)
    # video frames at 0.1, 0.14 and 0.18 s; output times 0, 0.04, ..., 0.2 s
    assert np.array_equal(_frame_indices(read_video(path, fps=25)), [0, 0, 0, 0, 1, 2])
    assert np.array_equal(_frame_indices(read_video(path)), [0, 1, 2])
    assert len(read_audio(path)) == round(0.22 * SAMPLE_RATE)


# ----------------------------------------------------------------------------- windows and seeking


@pytest.mark.parametrize("fps", [None, 25, 30])
@pytest.mark.parametrize("start_frame, num_frames", [(0, 10), (13, 20), (35, 30), (45, 40)])
def test_video_window_equals_slice_of_full_read(clip_30fps, fps, start_frame, num_frames):
    rate = fps or 30
    full = read_video(clip_30fps, fps=fps)
    window = read_video(clip_30fps, start_s=start_frame / rate, duration_s=num_frames / rate, fps=fps)
    assert np.array_equal(window, full[start_frame:start_frame + num_frames])


def test_windowed_reads_seek_instead_of_decoding_from_start(clip_30fps, monkeypatch):
    seeks, decoded = [], []
    seek, frames = media._StreamReader._seek, media._StreamReader.frames

    def spy_frames(reader):
        for item in frames(reader):
            decoded.append(item[1])
            yield item

    monkeypatch.setattr(media._StreamReader, "_seek", lambda reader, t: seeks.append(t) or seek(reader, t))
    monkeypatch.setattr(media._StreamReader, "frames", spy_frames)
    read_video(clip_30fps, start_s=1.2, duration_s=0.4)
    assert len(seeks) == 1 and 1.0 <= seeks[0] < 1.2
    assert min(decoded) >= 1.0 and max(decoded) <= 1.6 + 1 / 30  # stops one frame past the window


def test_seek_that_lands_late_is_retried_further_back(clip_30fps, monkeypatch):
    full = read_video(clip_30fps)
    seek = media._StreamReader._seek
    targets = []

    def late_first_seek(reader, time_s):
        targets.append(time_s)
        seek(reader, time_s + (1 if len(targets) == 1 else 0))

    monkeypatch.setattr(media._StreamReader, "_seek", late_first_seek)
    window = read_video(clip_30fps, start_s=1.2, duration_s=0.5)  # first seek lands at 1.5 s
    assert len(targets) == 2 and targets[1] < targets[0]
    assert np.array_equal(window, full[36:51])


@pytest.mark.parametrize("start_s, duration_s", [(0.0, 0.5), (0.37, 0.81), (1.6, 0.2), (2.3, None)])
def test_audio_window_equals_slice_of_full_read_mp4(clip, start_s, duration_s):
    path = clip[0]
    full = read_audio(path)
    window = read_audio(path, start_s=start_s, duration_s=duration_s)
    first = round(start_s * SAMPLE_RATE)
    expected = full[first:] if duration_s is None else full[first:first + round(duration_s * SAMPLE_RATE)]
    assert window.shape == expected.shape
    assert np.abs(window - expected).max() < 1e-3


@pytest.mark.parametrize("sample_rate", [16000, 22050, 8000])
@pytest.mark.parametrize("start_s, duration_s", [(0.123, 0.4), (0.5, None), (0.9, 0.5)])
def test_audio_window_equals_slice_of_full_read_resampled(stereo_wav, sample_rate, start_s, duration_s):
    full = read_audio(stereo_wav, sample_rate=sample_rate)
    window = read_audio(stereo_wav, start_s=start_s, duration_s=duration_s, sample_rate=sample_rate)
    first = round(start_s * sample_rate)
    stop = None if duration_s is None else first + round(duration_s * sample_rate)
    expected = full[first:stop][:len(full)]
    assert window.shape == expected.shape
    assert np.abs(window - expected).max() < 1e-3


def test_reads_past_the_end_are_empty(clip):
    path = clip[0]
    assert read_video(path, start_s=5.0).shape == (0, HEIGHT, WIDTH, 3)
    assert read_video(path, start_s=5.0, fps=25, gray=True).shape == (0, HEIGHT, WIDTH)
    assert read_audio(path, start_s=5.0).shape == (0,)
    assert len(read_video(path, start_s=2.5, duration_s=2.0, fps=25)) == 13  # times 2.5 ... 2.98
    assert len(read_audio(path, start_s=2.5, duration_s=2.0)) == round(0.5 * SAMPLE_RATE)


# ----------------------------------------------------------------------------- resampling


def test_stereo_44k_reads_as_half_amplitude_mono_16k(stereo_wav):
    audio = read_audio(stereo_wav, sample_rate=16000)
    assert audio.dtype == np.float32 and audio.shape == (16000,)
    assert count_audio_samples(stereo_wav, sample_rate=16000) == 16000
    expected = _sine(440, 16000, 16000, 0.4)
    inner = slice(200, -200)  # the resampler's filter sees silence beyond the ends
    assert np.abs(audio[inner] - expected[inner]).max() < 5e-3
    spectrum = np.abs(np.fft.rfft(audio))
    assert np.argmax(spectrum) * 16000 / len(audio) == pytest.approx(440, abs=1)


def test_8k_file_is_upsampled(tmp_path):
    path = tmp_path / "narrow.wav"
    write_audio(path, _sine(300, 8000, 8000, 0.5), sample_rate=8000)
    assert probe(path).audio_sample_rate == 8000
    audio = read_audio(path, sample_rate=16000)
    assert audio.shape == (16000,)
    inner = slice(200, -200)
    assert np.abs(audio[inner] - _sine(300, 16000, 16000, 0.5)[inner]).max() < 5e-3


def test_channels_are_averaged_not_downmixed(tmp_path):
    """A 3.0 layout (FL FR FC): the plain mean, not libswresample's centre-weighted downmix."""
    path = tmp_path / "three.wav"
    channels = np.stack([_sine(200, 4410, 44100, 0.6), _sine(500, 4410, 44100, 0.3),
                         np.full(4410, 0.3, np.float32)])
    _write_pcm_wav(path, channels, 44100, "3.0")
    audio = read_audio(path, sample_rate=44100)
    assert np.abs(audio - channels.mean(axis=0)).max() < 1e-4


def test_wav_round_trip_is_exact(tmp_path):
    path = tmp_path / "speech.wav"
    samples = (np.random.default_rng(2).integers(-32768, 32767, 12345) / 32768).astype(np.float32)
    write_audio(path, samples, sample_rate=16000)
    info = probe(path)
    assert (info.has_video, info.audio_channels, info.num_audio_samples) == (False, 1, 12345)
    assert np.array_equal(read_audio(path), samples)
    assert count_audio_samples(path, sample_rate=16000) == 12345


# ----------------------------------------------------------------------------- grey and size


def test_gray_read_of_rgb_file_is_luma(tmp_path):
    path = tmp_path / "colours.mp4"
    colours = np.array([[200, 0, 0], [0, 200, 0], [0, 0, 200], [30, 120, 220]], np.uint8)
    frames = np.repeat(np.broadcast_to(colours[:, None, None, :], (4, HEIGHT, WIDTH, 3)), 2, axis=0)
    write_video(path, frames, FPS)
    gray = read_video(path, gray=True)
    assert gray.shape == (8, HEIGHT, WIDTH) and gray.dtype == np.uint8
    luma = frames.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # BT.601
    assert np.abs(gray.mean(axis=(1, 2)) - luma.mean(axis=(1, 2))).max() < 3


def test_gray_frames_come_back_gray_and_resized(tmp_path):
    path = tmp_path / "gray.mp4"
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    image = (40 + 2 * x + y).astype(np.uint8)
    frames = np.stack([np.roll(image, shift, axis=1) for shift in range(10)])
    write_video(path, frames, FPS)
    gray = read_video(path, gray=True)
    assert gray.shape == frames.shape
    assert np.abs(gray.astype(float) - frames).mean() < 3
    rgb = read_video(path)
    assert np.abs(rgb.astype(int) - rgb[..., :1]).max() <= 2  # no colour appeared
    small = read_video(path, gray=True, size=(24, 32))
    assert small.shape == (10, 24, 32)
    assert np.abs(small.astype(float) - frames[:, ::2, ::2].astype(float)).mean() < 4


def test_mpeg4_fallback_codec_round_trips(tmp_path):
    path = tmp_path / "mpeg4.mp4"
    write_video(path, _indexed_frames(20), FPS, video_codec="mpeg4")
    assert np.array_equal(_frame_indices(read_video(path)), np.arange(20))


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def bad_files(tmp_path, clip):
    data = clip[0].read_bytes()
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "truncated.mp4").write_bytes(data[:len(data) // 2])
    (tmp_path / "text.mp4").write_text("this is not a video\n" * 50)
    write_audio(tmp_path / "sound.wav", np.zeros(1600, np.float32))
    write_video(tmp_path / "silent.mp4", _indexed_frames(5), FPS)
    return tmp_path


@pytest.mark.parametrize("name, reader, hint", [
    ("empty.mp4", read_video, "empty"),
    ("truncated.mp4", read_video, "truncated or corrupt.*re-encode"),
    ("truncated.mp4", probe, "truncated or corrupt"),
    ("text.mp4", read_audio, "not a readable media file"),
    ("missing.mp4", read_video, "no such file; check the path"),
    ("missing.mp4", count_audio_samples, "no such file"),
    ("sound.wav", read_video, "no video stream.*read_audio"),
    ("silent.mp4", read_audio, "no audio stream.*read_video"),
])
def test_bad_input_raises_media_error_naming_file_and_hint(bad_files, name, reader, hint):
    path = bad_files / name
    with pytest.raises(MediaError, match=f"{name}: .*{hint}") as caught:
        reader(path)
    assert caught.value.path == str(path)


def test_truncated_file_with_index_in_front_is_detected(tmp_path):
    """An mp4 with its index first (faststart) opens when cut; the missing data must be noticed."""
    path, cut = tmp_path / "front.mp4", tmp_path / "front_cut.mp4"
    with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        noise = np.random.default_rng(3).integers(0, 256, (50, HEIGHT, WIDTH, 3), dtype=np.uint8)
        for index, image in enumerate(noise):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    data = path.read_bytes()
    cut.write_bytes(data[:len(data) // 2])
    assert len(read_video(path)) == 50
    with pytest.raises(MediaError, match="front_cut.mp4: the file is truncated.*create it again"):
        read_video(cut)
    with pytest.raises(MediaError, match="truncated"):
        count_video_frames(cut)


def test_decoder_errors_become_media_errors(tmp_path, clip):
    data = bytearray(clip[0].read_bytes())
    start = data.find(b"mdat") + 8
    noise = np.random.default_rng(4).integers(0, 256, len(data) // 2, dtype=np.uint8).tobytes()
    data[start:start + len(noise)] = noise
    path = tmp_path / "garbled.mp4"
    path.write_bytes(bytes(data))
    for reader in (read_video, read_audio):
        with pytest.raises(MediaError, match="garbled.mp4: .*corrupt") as caught:
            reader(path)
        assert isinstance(caught.value.__cause__, av.error.FFmpegError)


def test_timeout_raises_media_error(clip):
    with pytest.raises(MediaError, match="clip.mp4: decoding took longer than timeout_s.*larger timeout_s"):
        read_video(clip[0], timeout_s=1e-9)
    with pytest.raises(MediaError, match="timeout_s"):
        read_audio(clip[0], timeout_s=0)


def test_invalid_arguments_are_rejected(tmp_path, clip):
    with pytest.raises(ValueError, match="start_s"):
        read_video(clip[0], start_s=-1)
    with pytest.raises(ValueError, match="fps must be > 0"):
        read_video(clip[0], fps=0)
    with pytest.raises(ValueError, match="even sizes"):
        write_video(tmp_path / "odd.mp4", np.zeros((2, 47, 64, 3), np.uint8), FPS)
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "float.mp4", np.zeros((2, 48, 64, 3), np.float32), FPS)
    with pytest.raises(ValueError, match="mono"):
        write_audio(tmp_path / "stereo.wav", np.zeros((100, 2), np.float32))
    with pytest.raises(MediaError, match="no_such_dir.*no such file"):
        write_audio(tmp_path / "no_such_dir" / "a.wav", np.zeros(100, np.float32))
