"""Audio-visual offset of a whole video with a Synchformer stage-2 model (the library part of
``avsync predict``; the demo reuses it).

- :func:`load_sync_model` loads a checkpoint and reads what inference needs from its config.
- :func:`predict_video` decodes a video of any length and container at the model's rates
  (25 fps, 16 kHz mono), computes the tower features ONCE per segment (a segment starts every
  ``stride_frames`` frames / ``stride_samples`` samples) and slides windows of S segments over
  them. A window reuses the features of its segments, which it shares with every other window
  that contains them, so a dense window stride only adds runs of the small sync module.
- Each window gives a distribution over the offset grid; the video's estimate is the argmax
  of their mean.
- :func:`plot_prediction` draws the heat map; :func:`avplugins.data.media.write_shifted_copy` writes a copy whose
  audio is shifted into sync.

A positive offset means the audio is early: the audio crop starts ``offset`` seconds after
the video crop (what is heard now is shown ``offset`` seconds later).
"""
import dataclasses
import os
from collections import defaultdict
from dataclasses import dataclass
from fractions import Fraction
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from fairseq.models import MODEL_REGISTRY
from tqdm import tqdm

from avplugins.checkpoint import load_model_and_config
from avplugins.data import media
from avplugins.data.features import synchformer_audio_features_at
from avplugins.data.sync_sampling import SegmentLayout, offset_grid, segment_start_frames, segment_start_samples
from avplugins.data.transforms import synchformer_video_transform
from avplugins.models.synchformer import SynchformerModel

OFFSET_CONVENTION = (
    "positive offset: the audio is early (the audio crop starts offset seconds after the video "
    "crop; what is heard now is shown offset seconds later)"
)
# Synchformer's videos are re-encoded to short side 256 before the 224 crop.
PAPER_SHORT_SIDE = 256
PAPER_CROP = 224
SYNCHRONIZABLE_CLASS = 1  # sync head: class 1 = synchronizable (``sync_target`` of the datasets)


class SyncInputError(ValueError):
    """A video (or checkpoint) that ``avsync predict`` cannot work on; the message names it."""


@dataclass(frozen=True)
class SyncSettings:
    """What inference reads from a stage-2 checkpoint.

    Attributes:
        layout: the segments of ONE window (S segments of ``segment_frames``, ``stride_frames``
            apart) and the rates the video is decoded at.
        crop_size: side of the square centre crop (pixels).
        short_side: frames are resized so that their short side has this size before cropping.
        grid_s: the offset classes (seconds); empty for a model without an offset head.
        has_sync_head: whether the model predicts synchronizability.
    """

    checkpoint: str
    model_name: str
    layout: SegmentLayout
    crop_size: int
    short_side: int
    grid_s: Tuple[float, ...]
    has_sync_head: bool

    @property
    def has_offset_head(self) -> bool:
        return len(self.grid_s) > 0

    @property
    def segment_stride_s(self) -> float:
        return self.layout.stride_frames / self.layout.video_fps

    def to_json(self) -> dict:
        layout = self.layout
        return {
            "checkpoint": os.path.abspath(self.checkpoint),
            "model": self.model_name,
            "num_segments": layout.num_segments,
            "segment_s": layout.segment_frames / layout.video_fps,
            "segment_stride_s": self.segment_stride_s,
            "window_s": layout.span_s,
            "video_fps": layout.video_fps,
            "sample_rate": layout.sample_rate,
            "crop_size": self.crop_size,
            "short_side": self.short_side,
            "has_offset_head": self.has_offset_head,
            "has_sync_head": self.has_sync_head,
        }


def _is_stage2_synchformer(model_name: Optional[str]) -> bool:
    model_cls = MODEL_REGISTRY.get(model_name)
    return model_cls is not None and issubclass(model_cls, SynchformerModel)


def load_sync_model(path: str, device: Optional[str] = None, short_side: Optional[int] = None):
    """Load a Synchformer stage-2 checkpoint for inference.

    Args:
        path: a checkpoint written by training (``synchformer*`` model, ``av_sync`` task) or by
            ``avplugins-convert``.
        device: torch device (default CPU).
        short_side: resize frames to this short side before the centre crop (default: the
            task's ``resize_short_side``, else ``crop_size * 256 / 224`` as in the paper).
    Returns:
        (model in eval mode on ``device``, :class:`SyncSettings`).
    Raises:
        FileNotFoundError, avplugins.checkpoint.UnsafeCheckpointError: no file / refused pickle.
        SyncInputError: not a stage-2 Synchformer checkpoint.
    """
    model, cfg = load_model_and_config(path, device=device)
    model_cfg, task_cfg = cfg.get("model") or {}, cfg.get("task") or {}
    model_name, task_name = model_cfg.get("_name"), task_cfg.get("_name")
    if task_name != "av_sync" or not _is_stage2_synchformer(model_name):
        raise SyncInputError(
            f"{path}: not a Synchformer stage-2 checkpoint (model {model_name!r}, task {task_name!r}); "
            "avsync needs a `synchformer` model trained with the `av_sync` task (a stage-1 "
            "`synchformer_segment_clip` checkpoint has no offset classifier), or an official "
            "stage-2 file imported with `avplugins-convert synchformer`"
        )
    crop_size = int(model.cfg.image_size)
    short_side = short_side or task_cfg.get("resize_short_side") or round(crop_size * PAPER_SHORT_SIDE / PAPER_CROP)
    if short_side < crop_size:
        raise SyncInputError(f"short side {short_side} is smaller than the model's {crop_size}-pixel crop")
    layout = SegmentLayout(
        num_segments=int(model.cfg.num_segments),
        segment_frames=int(model.cfg.segment_frames),
        stride_frames=int(task_cfg["segment_stride_frames"]),
        video_fps=int(task_cfg["video_fps"]),
        sample_rate=int(task_cfg["sample_rate"]),
    )
    grid = offset_grid(task_cfg["max_offset_s"], model.cfg.num_offset_classes) if model.cfg.offset_head else ()
    settings = SyncSettings(
        checkpoint=path, model_name=model_name, layout=layout, crop_size=crop_size,
        short_side=int(short_side), grid_s=tuple(float(g) for g in grid),
        has_sync_head=bool(model.cfg.sync_head),
    )
    return model, settings


# ----------------------------------------------------------------------------- segments and windows


def num_full_segments(num_frames: int, num_samples: int, layout: SegmentLayout) -> int:
    """Segments (``stride_frames`` apart from frame 0) whose frames and samples all exist."""
    by_video = (num_frames - layout.segment_frames) // layout.stride_frames + 1
    by_audio = (num_samples - layout.segment_samples) // layout.stride_samples + 1
    return max(0, min(by_video, by_audio))


def window_stride_segments(window_stride_s: float, layout: SegmentLayout) -> int:
    """A window stride in seconds as a whole number of segment strides (>= 1).

    Raises:
        ValueError: not a positive multiple of the segment stride.
    """
    segment_stride_s = layout.stride_frames / layout.video_fps
    ratio = window_stride_s / segment_stride_s
    if window_stride_s <= 0 or round(ratio) < 1 or abs(ratio - round(ratio)) > 1e-6:
        raise ValueError(
            f"window stride {window_stride_s} s must be a positive multiple of the segment stride "
            f"{segment_stride_s:g} s (windows start on the segment grid, where features are shared)"
        )
    return round(ratio)


def window_start_segments(num_segments: int, window_segments: int, stride_segments: int) -> np.ndarray:
    """(W,) index of the first segment of every window of ``window_segments`` segments that
    fits in ``num_segments``, ``stride_segments`` apart from segment 0 (empty if none fits)."""
    if num_segments < window_segments:
        return np.zeros(0, dtype=np.int64)
    return np.arange(0, num_segments - window_segments + 1, stride_segments, dtype=np.int64)


# ----------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class DecodedMedia:
    """A video file at the model's rates: the audio (decoded whole) and what the frame reads need."""

    path: str
    samples: np.ndarray  # (N,) float32 mono at layout.sample_rate
    num_frames: int  # frames at layout.video_fps
    frame_size: Tuple[int, int]  # (H, W) the frames are decoded at (short side resized)


def resized_frame_size(height: int, width: int, short_side: int) -> Tuple[int, int]:
    """(H, W) with the short side ``short_side`` and the aspect ratio kept (long side
    truncated, as :func:`avplugins.data.transforms.resize_short_side`)."""
    if height <= width:
        return short_side, int(short_side * width / height)
    return int(short_side * height / width), short_side


def open_media(path: str, settings: SyncSettings) -> DecodedMedia:
    """Probe ``path``, decode its audio (mono, the model's rate) and count its frames.

    Raises:
        SyncInputError: no video or audio stream, or shorter than one window.
        avplugins.data.media.MediaError: unreadable file.
    """
    layout = settings.layout
    info = media.probe(path)
    for present, stream in ((info.has_video, "video"), (info.has_audio, "audio")):
        if not present:
            raise SyncInputError(f"{path}: has no {stream} stream; avsync needs a file with both audio and video")
    num_frames = media.count_video_frames(path, fps=layout.video_fps)
    samples = media.read_audio(path, sample_rate=layout.sample_rate)
    if num_full_segments(num_frames, len(samples), layout) < layout.num_segments:
        raise SyncInputError(
            f"{path}: too short: {num_frames / layout.video_fps:.2f} s of video and "
            f"{len(samples) / layout.sample_rate:.2f} s of audio, but one window needs "
            f"{layout.span_s:.2f} s of both (the minimum length)"
        )
    return DecodedMedia(path, samples, num_frames, resized_frame_size(info.height, info.width, settings.short_side))


def decode_segments(
    source: DecodedMedia, first: int, count: int, settings: SyncSettings
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Model inputs of segments ``first ... first + count - 1`` of the whole video.

    Returns:
        video (count, segment_frames, 3, crop, crop) normalised frames,
        audio (count, 1, 128, 66) normalised log-mels.
    """
    layout = dataclasses.replace(settings.layout, num_segments=count)
    start_frame = first * layout.stride_frames
    frames = media.read_video(
        source.path, start_s=Fraction(start_frame, layout.video_fps),
        duration_s=Fraction(layout.span_frames, layout.video_fps), fps=layout.video_fps,
        size=source.frame_size,
    )
    if len(frames) < layout.span_frames:
        raise media.MediaError(
            source.path, f"decoded {len(frames)} frames from frame {start_frame} where "
                         f"{layout.span_frames} were counted; the file may be damaged, re-encode it"
        )
    video = synchformer_video_transform(frames[: layout.span_frames], crop_size=settings.crop_size)
    first_sample = first * layout.stride_samples
    samples = torch.from_numpy(source.samples[first_sample: first_sample + layout.span_samples])
    frame_index = segment_start_frames(layout, 0)[:, None] + np.arange(layout.segment_frames)
    audio_starts = torch.as_tensor(segment_start_samples(layout, 0))
    return video[torch.as_tensor(frame_index)], synchformer_audio_features_at(samples, audio_starts, layout.segment_samples)


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def segment_features(
    model, source: DecodedMedia, num_segments: int, settings: SyncSettings, batch_size: int = 16,
    progress: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Tower features of segments 0 ... num_segments - 1, each computed once, ``batch_size``
    segments per tower call (and per decoded stretch of video).

    Returns:
        vfeats (num_segments, tv, Dv), afeats (num_segments, ta, Da) on the model's device.
    """
    device = _model_device(model)
    visual, audio = [], []
    long_video = num_segments > batch_size
    with tqdm(total=num_segments, unit="segment", desc=os.path.basename(source.path),
              disable=None if progress and long_video else True) as bar:
        for first in range(0, num_segments, batch_size):
            count = min(batch_size, num_segments - first)
            video_in, audio_in = decode_segments(source, first, count, settings)
            # every segment as its own clip of one segment: (count, 1, ...)
            vfeats, afeats = model.forward_features(video_in[:, None].to(device), audio_in[:, None].to(device))
            visual.append(vfeats[:, 0])
            audio.append(afeats[:, 0])
            bar.update(count)
    return torch.cat(visual), torch.cat(audio)


@torch.inference_mode()
def window_logits(
    model, vfeats: torch.Tensor, afeats: torch.Tensor, starts: np.ndarray, window_segments: int,
    batch_size: int = 64,
) -> Dict[str, torch.Tensor]:
    """The sync module on windows of shared segment features.

    Args:
        vfeats: (N, tv, Dv), afeats: (N, ta, Da) per-segment tower features.
        starts: (W,) first segment of each window.
    Returns:
        ``offset_logits (W, n_offsets)`` and/or ``sync_logits (W, 2)``, float32 on the CPU.
    """
    outputs: Dict[str, List[torch.Tensor]] = defaultdict(list)
    segment_offsets = torch.arange(window_segments)
    for chunk in torch.as_tensor(starts).split(batch_size):
        index = (chunk[:, None] + segment_offsets).to(vfeats.device)  # (w, S)
        for name, logits in model.forward_head(vfeats[index], afeats[index]).items():
            outputs[name].append(logits.float().cpu())
    return {name: torch.cat(parts) for name, parts in outputs.items()}


# ----------------------------------------------------------------------------- prediction


@dataclass
class SyncPrediction:
    """The offset analysis of one video.

    Attributes:
        window_starts_s: (W,) window start times (seconds); each window lasts ``window_s``.
        offset_probabilities: (W, C) softmax over ``grid_s`` per window (None: no offset head).
        sync_probabilities: (W,) probability of "synchronizable" per window (None: no sync head).
        logits: the raw per-window logits (``offset_logits`` / ``sync_logits``).
    """

    path: str
    settings: SyncSettings
    video_s: float
    audio_s: float
    window_stride_s: float
    window_starts_s: np.ndarray
    logits: Dict[str, torch.Tensor]
    offset_probabilities: Optional[np.ndarray]
    sync_probabilities: Optional[np.ndarray]

    @property
    def grid_s(self) -> np.ndarray:
        return np.asarray(self.settings.grid_s)

    @property
    def window_s(self) -> float:
        return self.settings.layout.span_s

    @property
    def mean_offset_probabilities(self) -> Optional[np.ndarray]:
        """(C,) mean of the window distributions."""
        return None if self.offset_probabilities is None else self.offset_probabilities.mean(axis=0)

    @property
    def estimate_s(self) -> Optional[float]:
        """The grid offset with the highest mean probability (seconds)."""
        mean = self.mean_offset_probabilities
        return None if mean is None else float(self.grid_s[mean.argmax()])

    @property
    def confidence(self) -> Optional[float]:
        """The mean probability of :attr:`estimate_s`."""
        mean = self.mean_offset_probabilities
        return None if mean is None else float(mean.max())

    def top_offsets(self, k: int = 3) -> List[Tuple[float, float]]:
        """The ``k`` most probable (offset seconds, mean probability), best first."""
        mean = self.mean_offset_probabilities
        if mean is None:
            return []
        order = np.argsort(-mean, kind="stable")[:k]
        return [(float(self.grid_s[i]), float(mean[i])) for i in order]

    @property
    def sync_probability(self) -> Optional[float]:
        """Mean probability over the windows that the video can be synchronised."""
        return None if self.sync_probabilities is None else float(self.sync_probabilities.mean())

    def to_json(self) -> dict:
        windows = []
        for index, start_s in enumerate(self.window_starts_s):
            window = {"start_s": round(float(start_s), 6), "end_s": round(float(start_s) + self.window_s, 6)}
            if self.offset_probabilities is not None:
                probabilities = self.offset_probabilities[index]
                window["probabilities"] = [round(float(p), 6) for p in probabilities]
                window["argmax_offset_s"] = float(self.grid_s[probabilities.argmax()])
            if self.sync_probabilities is not None:
                window["sync_probability"] = round(float(self.sync_probabilities[index]), 6)
            windows.append(window)
        result = {
            "path": self.path,
            "video_s": round(self.video_s, 6),
            "audio_s": round(self.audio_s, 6),
            "window_s": self.window_s,
            "window_stride_s": self.window_stride_s,
            "num_windows": len(windows),
            "estimate_s": self.estimate_s,
            "confidence": self.confidence,
            "top3": [{"offset_s": offset, "probability": p} for offset, p in self.top_offsets(3)],
            "sync_probability": self.sync_probability,
            "windows": windows,
        }
        if not self.settings.has_offset_head:
            result["note"] = (
                "this model has only a synchronizability head: it tells whether the video can be "
                "synchronised (sync_probability), not the offset"
            )
        return result


def predict_video(
    model, settings: SyncSettings, path: str, window_stride_s: Optional[float] = None,
    batch_size: int = 16, progress: bool = True,
) -> SyncPrediction:
    """Offset (and synchronizability) of the whole video at ``path``.

    Args:
        window_stride_s: seconds between window starts, a multiple of the segment stride
            (default: the segment stride, 0.32 s in the paper).
        batch_size: segments per tower call.
        progress: show a progress bar on long videos (when stderr is a terminal).
    Raises:
        SyncInputError: no audio or video stream, shorter than one window, bad window stride.
        avplugins.data.media.MediaError: unreadable file.
    """
    layout = settings.layout
    window_stride_s = settings.segment_stride_s if window_stride_s is None else window_stride_s
    try:
        stride_segments = window_stride_segments(window_stride_s, layout)
    except ValueError as error:
        raise SyncInputError(str(error)) from None
    source = open_media(path, settings)
    total = num_full_segments(source.num_frames, len(source.samples), layout)
    starts = window_start_segments(total, layout.num_segments, stride_segments)
    # segments after the last window belong to no window: not computed
    vfeats, afeats = segment_features(
        model, source, int(starts[-1]) + layout.num_segments, settings, batch_size, progress
    )
    logits = window_logits(model, vfeats, afeats, starts, layout.num_segments)
    offset_logits, sync_logits = logits.get("offset_logits"), logits.get("sync_logits")
    return SyncPrediction(
        path=path,
        settings=settings,
        video_s=source.num_frames / layout.video_fps,
        audio_s=len(source.samples) / layout.sample_rate,
        window_stride_s=stride_segments * settings.segment_stride_s,
        window_starts_s=starts * layout.stride_frames / layout.video_fps,
        logits=logits,
        offset_probabilities=None if offset_logits is None else offset_logits.softmax(-1).numpy(),
        sync_probabilities=None if sync_logits is None else sync_logits.softmax(-1)[:, SYNCHRONIZABLE_CLASS].numpy(),
    )


# ----------------------------------------------------------------------------- plot


def plot_prediction(prediction: SyncPrediction, path: str) -> None:
    """Write a PNG: the offset distribution of every window as a heat map (x: window centre,
    y: offset, colour: probability) with the estimate marked; for a model with only a
    synchronizability head, that probability over time."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    centres = prediction.window_starts_s + prediction.window_s / 2
    name = os.path.basename(prediction.path)
    if prediction.offset_probabilities is not None:
        grid = prediction.grid_s
        half_x = prediction.window_stride_s / 2
        half_y = (grid[1] - grid[0]) / 2
        image = axes.imshow(
            prediction.offset_probabilities.T, origin="lower", aspect="auto", cmap="magma",
            extent=(centres[0] - half_x, centres[-1] + half_x, grid[0] - half_y, grid[-1] + half_y),
            interpolation="nearest", vmin=0.0,
        )
        figure.colorbar(image, ax=axes, label="probability")
        axes.axhline(prediction.estimate_s, color="cyan", linestyle="--", linewidth=1.5,
                     label=f"estimate {prediction.estimate_s:+.2f} s")
        axes.legend(loc="upper right")
        axes.set_ylabel("offset (s), + = audio early")
        axes.set_title(f"{name}: offset {prediction.estimate_s:+.2f} s (confidence {prediction.confidence:.2f})")
    else:
        axes.plot(centres, prediction.sync_probabilities, marker=".")
        axes.set_ylim(0, 1)
        axes.set_ylabel("P(synchronizable)")
        axes.set_title(f"{name}: synchronizability {prediction.sync_probability:.2f}")
    axes.set_xlabel("window centre (s)")
    figure.savefig(path, dpi=100)


# ----------------------------------------------------------------------------- corrected copy


# FFmpeg's default layout per channel count, for streams that only say "N channels" (e.g. PCM
# in Matroska), which the AAC encoder refuses.
