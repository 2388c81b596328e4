"""Offset and segment arithmetic of Synchformer (pure functions, no I/O).

Units are explicit in every name: ``*_s`` seconds, ``*_frame(s)`` video frames at ``video_fps``,
``*_sample(s)`` audio samples at ``sample_rate``. A positive offset means the audio crop starts
``offset_s`` seconds after the video crop ("audio is early": what is heard now is shown later).
"""
from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class SegmentLayout:
    """How a crop is cut into segments.

    Attributes:
        num_segments: S.
        segment_frames: video frames per segment (16 = 0.64 s at 25 fps).
        stride_frames: frames between segment starts (8 = 50 % overlap; = segment_frames for
            stage 1's non-overlapping segments).
        video_fps, sample_rate: 25 and 16000 in every recipe of the papers.
    """

    num_segments: int = 14
    segment_frames: int = 16
    stride_frames: int = 8
    video_fps: int = 25
    sample_rate: int = 16000

    def __post_init__(self):
        for name in ("num_segments", "segment_frames", "stride_frames", "video_fps", "sample_rate"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SegmentLayout.{name} must be positive, got {getattr(self, name)}")
        if self.sample_rate % self.video_fps:
            raise ValueError(
                f"sample_rate {self.sample_rate} must be a multiple of video_fps {self.video_fps} so "
                "that segment boundaries fall on whole samples"
            )

    @property
    def samples_per_frame(self) -> int:
        return self.sample_rate // self.video_fps

    @property
    def segment_samples(self) -> int:
        return self.segment_frames * self.samples_per_frame

    @property
    def stride_samples(self) -> int:
        return self.stride_frames * self.samples_per_frame

    @property
    def span_frames(self) -> int:
        """Frames covered by all segments together (120 for 14 x 16 with stride 8)."""
        return (self.num_segments - 1) * self.stride_frames + self.segment_frames

    @property
    def span_samples(self) -> int:
        return self.span_frames * self.samples_per_frame

    @property
    def span_s(self) -> float:
        return self.span_frames / self.video_fps


def offset_grid(max_offset_s: float = 2.0, num_classes: int = 21) -> np.ndarray:
    """The offset classes in seconds, ``linspace(-max, +max, num_classes)`` rounded to 1e-6
    (21 classes: -2.0, -1.8, ..., +2.0; class ``num_classes // 2`` is in sync)."""
    if num_classes < 3 or num_classes % 2 == 0:
        raise ValueError(f"num_classes must be odd and >= 3 (one class is 'in sync'), got {num_classes}")
    if max_offset_s <= 0:
        raise ValueError(f"max_offset_s must be positive, got {max_offset_s}")
    return np.round(np.linspace(-max_offset_s, max_offset_s, num_classes), 6)


def offset_to_class(offset_s: float, grid: np.ndarray) -> int:
    """Index of the grid value nearest to ``offset_s`` (seconds)."""
    return int(np.abs(np.asarray(grid) - offset_s).argmin())


def segment_start_frames(layout: SegmentLayout, first_frame: int) -> np.ndarray:
    """(S,) start frames of the segments, relative to the crop start."""
    return first_frame + layout.stride_frames * np.arange(layout.num_segments)


def segment_start_samples(layout: SegmentLayout, first_sample: int) -> np.ndarray:
    """(S,) start samples of the audio segments, relative to the audio crop start."""
    return first_sample + layout.stride_samples * np.arange(layout.num_segments)


def first_segment_frame(crop_frames: int, layout: SegmentLayout, train: bool, rng=None) -> int:
    """Where the first segment starts inside a crop of ``crop_frames`` frames: uniformly random
    in training, the middle of the slack otherwise (frame 2 for 125-frame crops of 120-frame
    spans), as the official ``GenerateMultipleSegments``."""
    slack = crop_frames - layout.span_frames
    if slack < 0:
        raise ValueError(
            f"a crop of {crop_frames} frames cannot hold {layout.num_segments} segments spanning "
            f"{layout.span_frames} frames"
        )
    return int(rng.integers(0, slack + 1)) if train else slack // 2


def sample_video_start_frame(
    num_video_frames: int, crop_frames: int, offset_s: float, video_fps: int, rng: np.random.Generator
) -> int:
    """Training-time crop start (frames) such that both the video crop ``[v, v + crop)`` and the
    audio crop shifted by ``offset_s`` lie inside a clip of ``num_video_frames`` frames.

    Raises ValueError when the clip is too short for this offset.
    """
    max_start = num_video_frames - crop_frames
    low_s = max(0.0, -offset_s)
    high_s = min(max_start / video_fps, max_start / video_fps - offset_s)
    if max_start < 0 or high_s < low_s:
        raise ValueError(
            f"clip of {num_video_frames} frames is too short for a {crop_frames}-frame crop at "
            f"offset {offset_s:+.2f} s"
        )
    low_frame = int(np.ceil(low_s * video_fps - 1e-9))
    high_frame = int(np.floor(high_s * video_fps + 1e-9))
    return int(rng.integers(low_frame, high_frame + 1))


def audio_start_sample(video_start_frame: int, offset_s: float, layout: SegmentLayout) -> int:
    """Audio crop start (samples) for a video crop starting at ``video_start_frame``."""
    return int(round((video_start_frame / layout.video_fps + offset_s) * layout.sample_rate))


def jitter_samples(
    start_sample: int,
    crop_samples: int,
    num_audio_samples: int,
    max_jitter_s: float,
    sample_rate: int,
    rng: Optional[np.random.Generator],
) -> int:
    """Shift ``start_sample`` uniformly by up to ``max_jitter_s`` seconds while keeping the crop
    ``[start, start + crop_samples)`` inside the audio; no shift when ``rng`` is None."""
    if rng is None or max_jitter_s <= 0:
        return start_sample
    max_jitter = int(max_jitter_s * sample_rate)
    left = min(start_sample, max_jitter)
    right = min(num_audio_samples - crop_samples - start_sample, max_jitter)
    if right < -left:
        return start_sample
    return start_sample + int(rng.integers(-left, right + 1))


def min_clip_frames_for_offsets(crop_frames: int, max_offset_s: float, video_fps: int) -> int:
    """Shortest clip (frames) on which every grid offset fits: the crop plus the largest
    offset (an offset of +d needs the video crop to end d seconds before the clip ends, -d
    needs it to start d seconds after the clip starts)."""
    return crop_frames + int(np.ceil(max_offset_s * video_fps - 1e-9))
