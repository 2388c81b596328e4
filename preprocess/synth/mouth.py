"""Render grayscale mouth regions of interest from mouth-shape trajectories, with numpy only.

The face is drawn in mouth coordinates (u to the speaker's left, v downwards, in pixels, origin
at the mouth centre); each frame's head pose (translation, rotation, scale) maps image pixels
into those coordinates, so skin texture, nostrils and lips move together. Shapes are lens-like
regions between an upper and a lower curve, v(u) = height * (1 - (u / half_width)^2) ** exponent
(exponent 0.5: an ellipse, 1: pointed corners), anti-aliased by a one-pixel soft edge.
"""
from dataclasses import dataclass

import numpy as np

from preprocess.synth.common import VIDEO_FPS, smooth_noise, soft_inside



@dataclass(frozen=True)
class Appearance:
    """A speaker's look; lengths are fractions of the image size, levels are gray values 0-255."""

    skin: float
    lip_contrast: float  # lip level = skin - lip_contrast
    cavity: float
    teeth_brightness: float  # teeth level = skin * teeth_brightness (at most 250)
    mouth_width: float  # half-width of the closed mouth
    lip_thickness: float
    opening_range: float  # inner half-height at full opening
    centre_offset: tuple  # (du, dv) of the mouth centre from the image centre
    light_direction: float  # radians
    light_gradient: float  # relative brightness change across the image
    texture: tuple  # ((ku, kv, phase, amplitude), ...) sinusoidal skin texture, k in rad/px
    nostrils: bool
    pixel_noise: float  # std of per-frame sensor noise


def sample_appearance(rng, image_size):
    """A random `Appearance` for a `image_size`-pixel square crop."""
    wavelengths = np.concatenate([rng.uniform(0.15, 0.6, 4), rng.uniform(0.02, 0.06, 4)]) * image_size
    angles = rng.uniform(0, np.pi, wavelengths.size)
    texture = tuple(
        (float(np.cos(a) * 2 * np.pi / w), float(np.sin(a) * 2 * np.pi / w), float(p), float(amp))
        for a, w, p, amp in zip(angles, wavelengths, rng.uniform(0, 2 * np.pi, wavelengths.size),
                                np.concatenate([rng.uniform(2, 8, 4), rng.uniform(0.5, 2.5, 4)]))
    )
    return Appearance(
        skin=float(rng.uniform(95, 205)),
        lip_contrast=float(rng.uniform(22, 60)),
        cavity=float(rng.uniform(12, 45)),
        teeth_brightness=float(rng.uniform(1.0, 1.3)),
        mouth_width=float(rng.uniform(0.28, 0.36)),
        lip_thickness=float(rng.uniform(0.07, 0.1)),
        opening_range=float(rng.uniform(0.2, 0.28)),
        centre_offset=(float(rng.uniform(-0.04, 0.04)), float(rng.uniform(-0.02, 0.06))),
        light_direction=float(rng.uniform(0, 2 * np.pi)),
        light_gradient=float(rng.uniform(0.05, 0.3)),
        texture=texture,
        nostrils=bool(rng.random() < 0.7),
        pixel_noise=float(rng.uniform(0.5, 2.5)),
    )


def sample_head_motion(rng, num_frames, fps):
    """Smooth head pose per frame (T, 4): translation du, dv (fraction of image), rotation
    (radians), log-scale; slow drifts of a few per cent, as in a tracked and cropped face."""
    amplitudes = np.array([0.025, 0.025, np.deg2rad(4.0), 0.04]) * rng.uniform(0.3, 1.0, 4)
    return smooth_noise(rng, num_frames, fps, max_frequency_hz=1.0, channels=4) * amplitudes



def _lens(u, v, half_width, upper, lower, exponent):
    """Coverage of the region between v = -upper * p(u) and v = lower * p(u), |u| < half_width,
    with p(u) = (1 - (u/half_width)^2) ** exponent; arrays broadcast as (T, H, W) with (T, 1, 1)
    shape parameters."""
    profile = np.clip(1.0 - (u / half_width) ** 2, 0.0, None) ** exponent
    inside_top = soft_inside(-upper * profile - v)
    inside_bottom = soft_inside(v - lower * profile)
    inside_sides = soft_inside(np.abs(u) - half_width)
    return inside_top * inside_bottom * inside_sides


def _mouth_coordinates(image_size, appearance, motion):
    """Per-frame mouth coordinates u, v (T, H, W) in pixels of every image pixel."""
    pixel = np.arange(image_size, dtype=np.float32) + 0.5
    centre_u = image_size * (0.5 + appearance.centre_offset[0] + motion[:, 0])
    centre_v = image_size * (0.5 + appearance.centre_offset[1] + motion[:, 1])
    x = pixel[None, None, :] - centre_u[:, None, None].astype(np.float32)
    y = pixel[None, :, None] - centre_v[:, None, None].astype(np.float32)
    cos = np.cos(motion[:, 2]).astype(np.float32)[:, None, None]
    sin = np.sin(motion[:, 2]).astype(np.float32)[:, None, None]
    inverse_scale = np.exp(-motion[:, 3]).astype(np.float32)[:, None, None]
    return (cos * x + sin * y) * inverse_scale, (cos * y - sin * x) * inverse_scale


def _skin(u, v, image_size, appearance, brightness):
    """Skin gray levels (T, H, W): texture, a lighting gradient, a darker chin shadow, nostrils;
    `brightness` (T, 1, 1) is the lighting flicker."""
    level = np.full(u.shape, appearance.skin, dtype=np.float32)
    for ku, kv, phase, amplitude in appearance.texture:
        level += amplitude * np.sin(ku * u + kv * v + phase)
    direction = np.cos(appearance.light_direction) * u + np.sin(appearance.light_direction) * v
    level *= 1.0 + appearance.light_gradient * direction / image_size
    level *= 1.0 - 0.12 * np.clip(v / image_size - 0.25, 0.0, None) / 0.25
    if appearance.nostrils:
        for side in (-1.0, 1.0):
            du, dv = u - side * 0.11 * image_size, v + 0.4 * image_size
            distance = np.sqrt((du / 1.6) ** 2 + dv**2) - 0.035 * image_size
            level -= 0.3 * appearance.skin * soft_inside(distance * 0.7)
    return level * brightness


@dataclass(frozen=True)
class _MouthGeometry:
    """Pixel sizes of the mouth per frame, each (T, 1, 1) to broadcast over (T, H, W)."""

    half_width: np.ndarray  # of the lips
    thickness: np.ndarray  # of the upper lip
    lower_thickness: np.ndarray
    inner_upper: np.ndarray  # opening above / below the lip line
    inner_lower: np.ndarray
    inner_half_width: np.ndarray
    outer_exponent: np.ndarray  # lip curve shapes (see the module docstring)
    inner_exponent: np.ndarray
    teeth_height: np.ndarray
    tongue_top: np.ndarray  # the tongue fills the opening below this


def _mouth_geometry(shape, appearance, image_size):
    """`_MouthGeometry` from mouth parameters (T, 5) (`visemes.PARAMETERS`)."""
    opening, width, rounding, teeth, tongue = (shape[:, i].astype(np.float32)[:, None, None] for i in range(5))
    size = float(image_size)
    half_width = size * appearance.mouth_width * (0.8 + 0.35 * width - 0.3 * rounding)
    thickness = size * appearance.lip_thickness * (1.0 + 0.35 * rounding)  # pursed lips bulge
    inner_lower = size * appearance.opening_range * 0.6 * opening  # the jaw moves the lower lip more
    return _MouthGeometry(
        half_width=half_width,
        thickness=thickness,
        # the lower lip tucks under the upper teeth for f, v: thinner when teeth show, mouth nearly shut
        lower_thickness=1.2 * thickness * (1.0 - 0.35 * teeth * (1.0 - opening)),
        inner_upper=size * appearance.opening_range * 0.4 * opening,
        inner_lower=inner_lower,
        inner_half_width=half_width * (0.88 - 0.3 * rounding),
        outer_exponent=0.75 - 0.2 * rounding,  # pursed lips have rounder corners
        inner_exponent=0.55 + 0.6 * rounding,  # and leave an oval opening
        teeth_height=size * 0.05 * teeth,
        tongue_top=inner_lower * (1.0 - 0.9 * tongue),
    )


def _mouth_inside(u, v, mouth, appearance, image_size):
    """Gray levels (T, H, W) seen through the opening: dark cavity, teeth, tongue."""
    depth = np.clip(1.0 - (u / mouth.inner_half_width) ** 2 - (v / (mouth.inner_lower + 1.0)) ** 2, 0.0, 1.0)
    inside = appearance.cavity * (1.0 - 0.5 * depth)
    upper_teeth = soft_inside(v + mouth.inner_upper - mouth.teeth_height)
    lower_teeth = soft_inside(mouth.inner_lower - 0.6 * mouth.teeth_height - v)
    gaps = 1.0 - 0.12 * np.cos(u * 2 * np.pi / (0.06 * image_size)) ** 8  # between the teeth
    teeth_level = min(appearance.skin * appearance.teeth_brightness, 250.0) * gaps
    inside += np.maximum(upper_teeth, lower_teeth) * (teeth_level - inside)
    tongue = soft_inside(mouth.tongue_top - v) * soft_inside(np.abs(u) - 0.6 * mouth.inner_half_width)
    tongue_level = (appearance.skin - 0.6 * appearance.lip_contrast) * 0.75
    inside += tongue * (tongue_level - inside)
    return inside


def render_mouth(shape, appearance, motion, image_size, rng):
    """Gray mouth crops uint8 (T, H, W), H = W = `image_size`.

    shape: (T, 5) mouth parameters (`visemes.PARAMETERS`); motion: (T, 4) head pose from
    `sample_head_motion`; rng draws the sensor noise and lighting flicker.
    """
    num_frames = shape.shape[0]
    u, v = _mouth_coordinates(image_size, appearance, motion)
    brightness = (1.0 + 0.03 * smooth_noise(rng, num_frames, VIDEO_FPS, max_frequency_hz=2.0)[:, 0])[:, None, None]
    image = _skin(u, v, image_size, appearance, brightness)
    mouth = _mouth_geometry(shape, appearance, image_size)

    bow = 0.25 * mouth.thickness * np.exp(-((u / (0.15 * mouth.half_width)) ** 2))  # cupid's bow
    lips = _lens(u, v + bow, mouth.half_width, mouth.inner_upper + mouth.thickness,
                 mouth.inner_lower + mouth.lower_thickness, mouth.outer_exponent)
    lip_shading = 1.0 - 0.12 * (v < 0)  # the upper lip faces down, away from the light
    image += lips * ((appearance.skin - appearance.lip_contrast) * brightness * lip_shading - image)
    seam = _lens(u, v, mouth.inner_half_width, 0.6, 0.6, mouth.inner_exponent)  # where the lips meet
    image += seam * 0.5 * (appearance.cavity - image)
    opening = _lens(u, v, mouth.inner_half_width, mouth.inner_upper, mouth.inner_lower, mouth.inner_exponent)
    image += opening * (_mouth_inside(u, v, mouth, appearance, image_size) * brightness - image)

    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(appearance.pixel_noise)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)
