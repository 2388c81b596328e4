"""Sparse-cue clips (the CPU stand-in for VGGSound-Sparse): mostly static RGB scenes with a few
short audio-visual events, each sound starting exactly when its picture happens.

Events (1-4 per clip, at least `MIN_EVENT_GAP_S` apart, on video frame boundaries):
- ball: a ball falls into view and hits the ground at the event time (thud), bouncing twice
  (quieter thuds at the later contacts), then rests;
- flash: the scene lights up for a few frames (bright, decaying) with a zap;
- door: a box lid swings shut, accelerating, and closes at the event time (slam).
The soundtrack also has pink noise, mains hum and a few quiet clicks that match nothing seen.
"""
from dataclasses import dataclass

import numpy as np

from preprocess.synth.common import (
    AUDIO_SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    VIDEO_FPS,
    clip_rng,
    frames_for_duration,
    noise_for_snr,
    pink_noise,
    smooth_noise,
    soft_inside,
    write_clip,
)

EVENT_TYPES = ("ball", "flash", "door")
MAX_EVENTS = 4
MIN_EVENT_GAP_S = 1.0
# events keep clear of the clip's edges: a fall or a swing is seen before its sound
EVENT_MARGIN_S = (0.8, 0.4)
MIN_CLIP_S = sum(EVENT_MARGIN_S) + 1 / VIDEO_FPS


@dataclass(frozen=True)
class SparseOptions:
    """Corpus-wide settings of sparse clips."""

    min_duration_s: float = 10.0
    max_duration_s: float = 10.0
    image_size: int = 128


@dataclass(frozen=True)
class Event:
    """One audio-visual event: its type, the frame where it happens and its look."""

    kind: str
    frame: int
    colour: tuple  # RGB 0-255
    x: float  # horizontal position, fraction of the width
    size: float  # fraction of the image size
    duration_s: float  # how long the fall / swing lasts before the event
    bounciness: float  # ball: coefficient of restitution

    @property
    def time_s(self):
        return self.frame / VIDEO_FPS


@dataclass(frozen=True)
class SparseClip:
    """A rendered clip: video uint8 (T, H, W, 3) at 25 fps, audio float32 (640 T,) at 16 kHz,
    and its events."""

    video: np.ndarray
    audio: np.ndarray
    events: tuple


# ----------------------------------------------------------------------------- event timing


def sample_event_frames(rng, num_frames):
    """Sorted event frames: 1-4 of them (fewer if the clip is short), at least
    `MIN_EVENT_GAP_S` apart and `EVENT_MARGIN_S` from the start / end."""
    first = int(np.ceil(EVENT_MARGIN_S[0] * VIDEO_FPS))
    last = num_frames - 1 - int(np.ceil(EVENT_MARGIN_S[1] * VIDEO_FPS))
    gap = int(round(MIN_EVENT_GAP_S * VIDEO_FPS))
    if last < first:
        raise ValueError(f"clips of {num_frames / VIDEO_FPS:.2f} s are too short for an event: "
                         f"use --min-duration >= {MIN_CLIP_S:.2f}")
    num_events = min(int(rng.integers(1, MAX_EVENTS + 1)), (last - first) // gap + 1)
    slack = last - first - (num_events - 1) * gap
    offsets = np.sort(rng.integers(0, slack + 1, num_events))
    return [int(first + offset + i * gap) for i, offset in enumerate(offsets)]


def sample_event(rng, kind, frame):
    """The look of one event of `kind` happening at `frame`."""
    return Event(
        kind=kind,
        frame=frame,
        colour=tuple(float(c) for c in rng.uniform(30, 230, 3)),
        x=float(rng.uniform(0.15, 0.85)),
        size=float(rng.uniform(0.05, 0.08) if kind == "ball" else rng.uniform(0.18, 0.3)),
        duration_s=float(rng.uniform(0.35, 0.6) if kind == "ball" else rng.uniform(0.3, 0.5)),
        bounciness=float(rng.uniform(0.25, 0.45)),
    )


def ball_contacts_s(event):
    """Times (seconds) the ball touches the ground: the event, then two bounces (all within
    0.8 s, so the bounces are quiet before the next event)."""
    # a bounce with restitution e lasts 2 e times the fall from the release height
    first_bounce = 2 * event.bounciness * event.duration_s
    return (event.time_s, event.time_s + first_bounce, event.time_s + first_bounce * (1 + event.bounciness))


# ----------------------------------------------------------------------------- pictures



def _covered_box(coverage):
    """(row slice, column slice) bounding where coverage (H, W) > 0 (empty slices if nowhere)."""
    rows, columns = np.flatnonzero(coverage.any(axis=1)), np.flatnonzero(coverage.any(axis=0))
    if rows.size == 0:
        return slice(0, 0), slice(0, 0)
    return slice(rows[0], rows[-1] + 1), slice(columns[0], columns[-1] + 1)


def _paint(images, coverage, colour):
    """Blend `colour` (3,) into images (..., H, W, 3) where coverage (H, W) says, in place."""
    box = _covered_box(coverage)
    region = images[..., box[0], box[1], :]
    region += coverage[box][..., None] * (np.asarray(colour, np.float32) - region)


@dataclass(frozen=True)
class Scene:
    """The static part of a clip: background image (H, W, 3) float32 and the ground line (px)."""

    background: np.ndarray
    ground_y: float


def sample_scene(rng, image_size):
    """A wall with a colour gradient and texture above a floor, with a few static shapes."""
    y, x = np.mgrid[0:image_size, 0:image_size].astype(np.float32) + 0.5
    ground_y = float(image_size * rng.uniform(0.72, 0.85))
    wall_top, wall_bottom, floor = rng.uniform(40, 220, (3, 3)).astype(np.float32)
    blend = (y / ground_y)[..., None]
    image = wall_top * (1 - blend) + wall_bottom * blend
    _paint(image, soft_inside(ground_y - y), floor)
    for _ in range(6):
        wavelength = rng.uniform(0.05, 0.5) * image_size
        angle, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi / wavelength * (np.cos(angle) * x + np.sin(angle) * y) + phase)
        image += rng.uniform(1, 6) * wave[..., None]
    for _ in range(int(rng.integers(0, 4))):  # static clutter on the wall
        centre = rng.uniform(0.1, 0.9, 2) * (image_size, ground_y)
        half = rng.uniform(0.04, 0.12, 2) * image_size
        distance = np.maximum(np.abs(x - centre[0]) - half[0], np.abs(y - centre[1]) - half[1])
        _paint(image, soft_inside(distance), rng.uniform(30, 230, 3))
    return Scene(image, ground_y)


def _ball_height_px(event, times_s, fall_height_px):
    """Height (T,) of the ball's bottom above the ground at `times_s`; NaN before its release."""
    gravity = 2 * fall_height_px / event.duration_s**2  # px / s^2
    heights = np.full(times_s.shape, np.nan)
    release_s = event.time_s - event.duration_s
    falling = (times_s >= release_s) & (times_s <= event.time_s)
    heights[falling] = fall_height_px - 0.5 * gravity * (times_s[falling] - release_s) ** 2
    contacts = ball_contacts_s(event)
    speed = gravity * event.duration_s
    for start, end in zip(contacts[:-1], contacts[1:]):
        speed *= event.bounciness
        flying = (times_s > start) & (times_s <= end)
        elapsed = times_s[flying] - start
        heights[flying] = np.maximum(speed * elapsed - 0.5 * gravity * elapsed**2, 0.0)
    heights[times_s > contacts[-1]] = 0.0
    return heights


def _paint_by_state(frames, states, paint_state):
    """Call `paint_state(images, state)` once per distinct state on all frames in that state
    (a resting ball or a closed lid is drawn once, not once per frame); None = nothing to draw."""
    frames_of_state = {}
    for index, state in enumerate(states):
        if state is not None:
            frames_of_state.setdefault(state, []).append(index)
    for state, indices in frames_of_state.items():
        images = frames[indices]
        paint_state(images, state)
        frames[indices] = images


def _draw_ball(frames, event, scene, times_s):
    """A ball falling from above the picture onto the ground, squashed at the contact frames,
    with a shadow that darkens as it comes down."""
    size = frames.shape[1]
    radius = event.size * size
    heights = _ball_height_px(event, times_s, scene.ground_y + 2 * radius)
    last_contact_s = ball_contacts_s(event)[-1]
    states = [None if np.isnan(h) else (float(h), bool(h < 0.5 and t <= last_contact_s))
              for h, t in zip(heights, times_s)]
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    centre_x = event.x * size
    shadow_shape = np.sqrt(((x - centre_x) / (radius * 1.2)) ** 2 + ((y - scene.ground_y) / (radius * 0.3)) ** 2)
    shadow = soft_inside((shadow_shape - 1.0) * radius)

    def paint(images, state):
        height, squashed = state
        half_height = radius * (0.75 if squashed else 1.0)
        centre_y = scene.ground_y - height - half_height
        _paint(images, 0.35 * np.exp(-height / (4 * radius)) * shadow, (0.0, 0.0, 0.0))
        distance = np.sqrt(((x - centre_x) / radius) ** 2 + ((y - centre_y) / half_height) ** 2)
        _paint(images, soft_inside((distance - 1.0) * half_height), event.colour)

    _paint_by_state(frames, states, paint)


def _draw_flash(frames, event, scene, times_s):
    """A bright light centred somewhere in the scene: strongest at the event frame, decaying
    over the next frames."""
    size = frames.shape[1]
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    glow = np.exp(-((x - event.x * size) ** 2 + (y - 0.3 * size) ** 2) / (2 * (0.6 * size) ** 2))
    for delay, strength in enumerate((0.85, 0.45, 0.15)):
        index = event.frame + delay
        if index < len(frames):
            frames[index] += (strength * (0.5 + 0.5 * glow))[..., None] * (255.0 - frames[index])


def _lid_angle(event, times_s):
    """Lid angle (T,) in radians: open (pi/2) until the swing starts, then accelerating shut
    (0 at the event frame)."""
    progress = np.clip((times_s - (event.time_s - event.duration_s)) / event.duration_s, 0.0, 1.0)
    return 0.5 * np.pi * (1.0 - progress**2)


def _draw_door(frames, event, scene, times_s):
    """A box on the ground whose lid, hinged at its top-left corner, swings shut."""
    size = frames.shape[1]
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    width = event.size * size
    left, top = event.x * (size - width), scene.ground_y - 0.6 * width
    box = soft_inside(np.maximum(np.maximum(left - x, x - left - width), np.maximum(top - y, y - scene.ground_y)))
    thickness = max(2.0, 0.06 * width)

    def paint(images, angle):
        _paint(images, box, event.colour)
        along = (x - left) * np.cos(angle) - (y - top) * np.sin(angle)
        across = (x - left) * np.sin(angle) + (y - top) * np.cos(angle) + thickness / 2
        lid = soft_inside(np.maximum(np.maximum(-along, along - width), np.abs(across) - thickness / 2))
        _paint(images, lid, np.asarray(event.colour) * 0.7)

    _paint_by_state(frames, [float(a) for a in _lid_angle(event, times_s)], paint)


_DRAW = {"ball": _draw_ball, "flash": _draw_flash, "door": _draw_door}
# balls fall in front of boxes; a flash lights everything
_DRAWING_ORDER = ("door", "ball", "flash")


def render_video(rng, scene, events, num_frames):
    """uint8 (T, H, W, 3): the scene with slow lighting drift, the events, and sensor noise."""
    times_s = np.arange(num_frames) / VIDEO_FPS  # frame k shows time k / 25
    drift = 1.0 + 0.02 * smooth_noise(rng, num_frames, VIDEO_FPS, max_frequency_hz=0.5)[:, 0]
    frames = scene.background[None] * drift[:, None, None, None].astype(np.float32)
    for event in sorted(events, key=lambda e: _DRAWING_ORDER.index(e.kind)):
        _DRAW[event.kind](frames, event, scene, times_s)
    frames += rng.standard_normal(frames.shape, dtype=np.float32) * np.float32(rng.uniform(1.0, 3.0))
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- sounds


def _decay(num_samples, time_constant_s):
    """Exponential envelope (num_samples,) falling by e every `time_constant_s` seconds."""
    return np.exp(-np.arange(num_samples) / (time_constant_s * AUDIO_SAMPLE_RATE))


def thud(rng, loudness):
    """An impact: a damped low tone (70-140 Hz) plus a short noise burst; starts at sample 0."""
    num_samples = int(0.3 * AUDIO_SAMPLE_RATE)
    t = np.arange(num_samples) / AUDIO_SAMPLE_RATE
    tone = np.sin(2 * np.pi * rng.uniform(70, 140) * t) * _decay(num_samples, rng.uniform(0.04, 0.08))
    burst = rng.standard_normal(num_samples) * _decay(num_samples, 0.008)
    return loudness * (0.8 * tone + 0.4 * burst)


def zap(rng, loudness):
    """An electric zap: a tone gliding down from 2-3 kHz, with a 2 ms attack."""
    num_samples = int(rng.uniform(0.12, 0.25) * AUDIO_SAMPLE_RATE)
    t = np.arange(num_samples) / AUDIO_SAMPLE_RATE
    start_hz, end_hz = rng.uniform(2000, 3000), rng.uniform(500, 1000)
    frequency = start_hz * (end_hz / start_hz) ** (t / t[-1])
    phase = 2 * np.pi * np.cumsum(frequency) / AUDIO_SAMPLE_RATE
    attack = np.clip(t / 0.002, 0.0, 1.0)
    return loudness * attack * np.sign(np.sin(phase)) * 0.5 * _decay(num_samples, 0.08)


def slam(rng, loudness):
    """A door slam: a sharp broadband crack and a low wooden resonance (150-300 Hz)."""
    num_samples = int(0.35 * AUDIO_SAMPLE_RATE)
    t = np.arange(num_samples) / AUDIO_SAMPLE_RATE
    crack = rng.standard_normal(num_samples) * _decay(num_samples, 0.015)
    body = np.sin(2 * np.pi * rng.uniform(150, 300) * t) * _decay(num_samples, rng.uniform(0.05, 0.1))
    return loudness * (0.6 * crack + 0.7 * body)


def _add_at(track, sound, time_s):
    """Add `sound` into `track` starting at `time_s` seconds (cut at the end), in place."""
    start = int(round(time_s * AUDIO_SAMPLE_RATE))
    if start < track.size:
        track[start : start + sound.size] += sound[: track.size - start]


def render_audio(rng, events, num_samples):
    """float32 (num_samples,): the events' sounds plus uncorrelated background (pink noise at
    15-30 dB below 0.3 RMS, about the events' level; mains hum; quiet clicks at random times)."""
    track = np.zeros(num_samples)
    for event in events:
        loudness = rng.uniform(0.35, 0.7)
        if event.kind == "ball":
            for bounce, contact_s in enumerate(ball_contacts_s(event)):
                _add_at(track, thud(rng, loudness * event.bounciness**bounce), contact_s)
        else:
            _add_at(track, (zap if event.kind == "flash" else slam)(rng, loudness), event.time_s)
    background = noise_for_snr(0.3, rng.uniform(15, 30), pink_noise(rng, num_samples))
    t = np.arange(num_samples) / AUDIO_SAMPLE_RATE
    mains_hz = (50.0, 60.0)[rng.integers(2)]
    background += rng.uniform(0.002, 0.01) * sum(np.sin(2 * np.pi * h * mains_hz * t) / h for h in (1, 2, 3))
    for _ in range(int(rng.integers(0, 6))):
        click = rng.uniform(0.01, 0.04) * rng.standard_normal(int(0.003 * AUDIO_SAMPLE_RATE))
        _add_at(background, click, rng.uniform(0, num_samples / AUDIO_SAMPLE_RATE))
    return np.clip(track + background, -1.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------- clips


def make_sparse_clip(rng, options, kinds=None):
    """Render one random clip; `kinds` (event types in time order) fixes the events' types."""
    num_frames = frames_for_duration(rng.uniform(options.min_duration_s, options.max_duration_s))
    frames = sample_event_frames(rng, num_frames)
    if kinds is not None:
        frames = frames[: len(kinds)]
        if len(frames) < len(kinds):
            raise ValueError(f"a {num_frames / VIDEO_FPS:.2f} s clip holds only {len(frames)} events, not {len(kinds)}")
    else:
        kinds = [EVENT_TYPES[i] for i in rng.integers(len(EVENT_TYPES), size=len(frames))]
    events = tuple(sample_event(rng, kind, frame) for kind, frame in zip(kinds, frames))
    scene = sample_scene(rng, options.image_size)
    video = render_video(rng, scene, events, num_frames)
    audio = render_audio(rng, events, num_frames * SAMPLES_PER_FRAME)
    return SparseClip(video, audio, events)


def write_sparse_clip(out_dir, split, clip_id, clip_index, seed, options):
    """Make clip `clip_index` of the corpus with `seed`, write it (`write_clip`) and return its
    `ClipResult` with the events as (type, seconds)."""
    clip = make_sparse_clip(clip_rng(seed, clip_index), options)
    events = tuple((event.kind, event.time_s) for event in clip.events)
    return write_clip(out_dir, split, clip_id, clip_index, clip, events=events)


# ----------------------------------------------------------------------------- events files


def write_events(path, clip_events):
    """Write `{split}.events.tsv`: one `id <TAB> event type <TAB> time in seconds` line per event,
    clips in manifest order. `clip_events` is [(clip id, ((type, seconds), ...)), ...]."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for clip_id, events in clip_events:
            f.writelines(f"{clip_id}\t{kind}\t{time_s:.3f}\n" for kind, time_s in events)


def _parse_event(line):
    """(clip id, event type, seconds) of one events line, or None when it is malformed."""
    fields = line.rstrip("\n").split("\t")
    if len(fields) != 3 or fields[1] not in EVENT_TYPES:
        return None
    try:
        return fields[0], fields[1], float(fields[2])
    except ValueError:
        return None


def read_events(path):
    """{clip id: [(event type, time in seconds), ...]} from a `{split}.events.tsv`."""
    events = {}
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            parsed = _parse_event(line)
            if parsed is None:
                expected = f"id <TAB> {'|'.join(EVENT_TYPES)} <TAB> seconds"
                raise ValueError(f"{path}:{line_number}: expected `{expected}`, found {line.rstrip()!r}. "
                                 "Regenerate the corpus with avplugins-synth sparse")
            clip_id, kind, time_s = parsed
            events.setdefault(clip_id, []).append((kind, time_s))
    return events
