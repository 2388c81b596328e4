"""Synchformer datasets: clips from an AV-HuBERT manifest cut into segments.

- :class:`AVSegmentDataset` (stage 1): one crop of S non-overlapping segments, audio and video
  aligned (up to a small training jitter).
- :class:`AVOffsetDataset` (stage 2): a video crop and an audio crop shifted by an offset from a
  grid, cut into S overlapping segments; random offsets in training, fixed ones (a csv written
  once by ``preprocess/sync_offsets.py``) for validation and test. ``synchronizability=True``
  draws half of the training offsets from the grid and half as +-the segment span (no overlap).

Items are ``{"id", "video" (S, T, 3, H, W) float32 normalised, "audio" (S, 1, 128, 66) float32
normalised log-mels, "offset_s", "offset_target", "sync_target"}``. With
``ClipSamplingConfig.uint8_video`` (what the tasks use) "video" holds uint8 frames instead, which
the Synchformer models normalise on their device (``transforms.normalized_segments``): stage 2's
overlapping segments as the clip's F unique frames (F, 3, H, W) plus ``"video_frame_index"``
(S, T) (frame t of segment s is ``video[index[s, t]]``), stage 1's as (S, T, 3, H, W): 7.5
(stage 2) or 4 (stage 1) times less memory and copying than float segments. Every random choice
of an item comes from a generator seeded by (seed, epoch, index), so a resumed run sees the same
samples.
"""
import csv
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from avplugins.data import sync_sampling
from avplugins.data.features import synchformer_audio_features_at
from avplugins.data.invalid_items import SKIP_HINT
from avplugins.data.manifest import ManifestEntry, validate_manifest
from avplugins.data.media import MediaError, probe, read_audio, read_video
from avplugins.data.row_dataset import ManifestRowDataset
from avplugins.data.sync_sampling import SegmentLayout
from avplugins.data.transforms import numpy_backed_empty, synchformer_video_transform


@dataclass(frozen=True)
class FixedOffset:
    offset_s: float
    video_start_s: float


def read_fixed_offsets(csv_path: str) -> Dict[str, FixedOffset]:
    """Read ``id,offset_sec,vstart_sec`` rows (the official repo's csv columns)."""
    offsets = {}
    with open(csv_path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"id", "offset_sec", "vstart_sec"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(
                f"{csv_path}: missing column(s) {sorted(missing)}; expected a header "
                "'id,offset_sec,vstart_sec' (write it with preprocess/sync_offsets.py)"
            )
        for line_number, row in enumerate(reader, start=2):
            try:
                offsets[row["id"]] = FixedOffset(float(row["offset_sec"]), float(row["vstart_sec"]))
            except ValueError as error:
                raise ValueError(f"{csv_path}:{line_number}: {error}") from None
    return offsets


def write_fixed_offsets(csv_path: str, offsets: Dict[str, FixedOffset]) -> None:
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "offset_sec", "vstart_sec"])
        for clip_id, fixed in offsets.items():
            writer.writerow([clip_id, f"{fixed.offset_s:.2f}", f"{fixed.video_start_s:.2f}"])


@dataclass
class ClipSamplingConfig:
    """What both Synchformer datasets share (see the task configs for the meaning of each)."""

    layout: SegmentLayout
    crop_size: int = 224
    resize_short_side: Optional[int] = None
    audio_jitter_s: float = 0.05
    sometimes_upscale_p: float = 0.0
    color_augment: bool = False
    skip_invalid: bool = False
    seed: int = 1
    uint8_video: bool = False  # uint8 frames in the items, except where colour augmentation needs floats


@dataclass(frozen=True)
class ClipWindow:
    """Where an item's segments come from.

    Attributes:
        video_start_frame: first frame of the first video segment (frames at ``video_fps``).
        audio_start_sample: first sample of the first audio segment (samples at ``sample_rate``).
        offset_s: the offset the item is labelled with (seconds; positive = audio is early).
        synchronizable: 1 when the offset is on the grid, 0 for the +-span (no overlap) offsets.
    """

    video_start_frame: int
    audio_start_sample: int
    offset_s: float = 0.0
    synchronizable: int = 1


def short_side_size(height: int, width: int, short_side: int) -> Tuple[int, int]:
    """(H, W) after resizing so that the shorter side has ``short_side`` pixels (aspect kept,
    the long side rounded to the nearest pixel)."""
    if height <= width:
        return short_side, max(1, round(width * short_side / height))
    return max(1, round(height * short_side / width)), short_side


def stack_in_memory_order(tensors: List[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(tensors)`` (B, ...) into :func:`numpy_backed_empty` memory, keeping
    channels-last memory: uint8 video items laid out as (..., H, W, 3) are stacked as such (a copy
    of whole pixel rows, where ``torch.stack`` would transpose every pixel into (..., 3, H, W)
    memory)."""
    first = tensors[0]
    channels_last = first.ndim >= 3 and not first.is_contiguous() and first.movedim(-3, -1).is_contiguous()
    if channels_last:
        tensors = [tensor.movedim(-3, -1) for tensor in tensors]
    batch = torch.stack(tensors, out=numpy_backed_empty((len(tensors), *tensors[0].shape), first.dtype))
    return batch.movedim(-1, -3) if channels_last else batch


class AVClipDataset(ManifestRowDataset):
    """Manifest access, window decoding, segmentation and collation shared by both stages.

    Subclasses choose windows (:meth:`sample_window`) and may change how an item is made from
    a window (:meth:`load_item`); ``input_keys`` are the item entries collated into
    ``net_input``. ``decoded_clips`` (a ``sync_feature_cache.DecodedClips`` of the split, decoded
    with the same settings) replaces decoding the media files. With ``config.skip_invalid``
    malformed manifest rows are left out and clips that fail to load are skipped (see
    :mod:`avplugins.data.invalid_items`).
    """

    input_keys: Tuple[str, ...] = ("video", "audio")
    # the official stage 1 cuts segments before flipping / colour-distorting, stage 2 after
    augment_per_segment = False

    def __init__(
        self, manifest_path: str, config: ClipSamplingConfig, train: bool, decoded_clips: Optional[Any] = None
    ):
        super().__init__()
        self.manifest_path = manifest_path
        self.config = config
        self.layout = config.layout
        self.train = train
        self.decoded_clips = decoded_clips
        self.entries, _ = validate_manifest(
            manifest_path, check_files=False, skip_invalid=config.skip_invalid, skip_hint=SKIP_HINT
        )
        self.init_skipping(config.skip_invalid)
        # colour-distorted frames are floats: those items stay normalised float32
        self.uint8_video = config.uint8_video and not (train and config.color_augment)
        self._frame_sizes: Dict[str, Tuple[int, int]] = {}

    def item_rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng((self.config.seed, self.epoch if self.train else 0, index))

    def num_tokens(self, index: int) -> int:
        return 1

    def size(self, index: int) -> int:
        return 1

    def ordered_indices(self) -> np.ndarray:
        if self.train:
            return np.random.default_rng((self.config.seed, self.epoch)).permutation(len(self))
        return np.arange(len(self))

    def decode_size(self, entry: ManifestEntry) -> Optional[Tuple[int, int]]:
        """(H, W) the decoder scales frames to (``resize_short_side``), None for the stored
        size. Scaling while decoding (libswscale) costs far less than resizing tensors."""
        if self.config.resize_short_side is None:
            return None
        if entry.video_path not in self._frame_sizes:
            info = probe(entry.video_path)
            if not info.has_video:
                raise MediaError(entry.video_path, "has no video stream (audio only?); pass a video file")
            self._frame_sizes[entry.video_path] = short_side_size(
                info.height, info.width, self.config.resize_short_side
            )
        return self._frame_sizes[entry.video_path]

    def decode(
        self, entry: ManifestEntry, video_start_frame: int, num_frames: int,
        audio_start_sample: int, num_samples: int,
    ) -> Tuple[np.ndarray, np.ndarray]:
        """``num_frames`` RGB frames from ``video_start_frame`` (uint8 (T, H, W, 3), scaled to
        :meth:`decode_size`) and ``num_samples`` audio samples from ``audio_start_sample``
        (float32 (N,)).

        Raises:
            MediaError: the files hold fewer frames or samples than the manifest promised.
        """
        layout = self.layout
        if self.decoded_clips is not None:
            frames, samples = self.decoded_clips.window(
                entry.id, video_start_frame, num_frames, audio_start_sample, num_samples
            )
        else:
            frames = read_video(
                entry.video_path,
                start_s=video_start_frame / layout.video_fps,
                duration_s=num_frames / layout.video_fps,
                fps=layout.video_fps,
                size=self.decode_size(entry),
            )
            samples = read_audio(
                entry.audio_path,
                start_s=audio_start_sample / layout.sample_rate,
                duration_s=num_samples / layout.sample_rate,
                sample_rate=layout.sample_rate,
            )
        if len(frames) < num_frames or len(samples) < num_samples:
            raise MediaError(
                entry.video_path,
                f"decoded {len(frames)} frames / {len(samples)} samples from frame {video_start_frame} / "
                f"sample {audio_start_sample} where the manifest row (line {entry.line_number}) promised at "
                f"least {num_frames} / {num_samples}; recount the manifest with preprocess/count_frames.py",
            )
        return frames, samples

    def video_transform(
        self, frames, rng: Optional[np.random.Generator], segment_starts: Optional[np.ndarray] = None,
        normalize: bool = True,
    ) -> torch.Tensor:
        """uint8 (..., T, H, W, 3) -> float32 (..., T, 3, crop, crop): random crop and flip
        (+ colour) when ``rng`` is given, centre crop otherwise; with ``segment_starts`` (S,)
        frames, the clip's segments (..., S, segment_frames, 3, crop, crop), cut after it is
        augmented; uint8 frames with ``normalize=False``."""
        return synchformer_video_transform(
            frames,
            crop_size=self.config.crop_size,
            train=rng is not None,
            rng=rng,
            color_augment=self.config.color_augment,
            small_crop_p=self.config.sometimes_upscale_p,
            segment_starts=segment_starts,
            segment_frames=None if segment_starts is None else self.layout.segment_frames,
            normalize=normalize,
        )

    def load_segments(
        self, entry: ManifestEntry, window: ClipWindow, rng: Optional[np.random.Generator]
    ) -> Dict[str, torch.Tensor]:
        """Decode the span of ``window`` and cut it into segments.

        Returns:
            ``video`` (S, T, 3, H, W) float32 normalised, ``audio`` (S, 1, 128, 66) float32; with
            :attr:`uint8_video`, ``video`` uint8 (S, T, 3, H, W), or for segments cut after the
            clip is augmented (stage 2) uint8 (F, 3, H, W) frames plus ``video_frame_index``
            (S, T) int64 into them.
        """
        layout = self.layout
        frames, samples = self.decode(
            entry, window.video_start_frame, layout.span_frames, window.audio_start_sample, layout.span_samples
        )
        segment_starts = sync_sampling.segment_start_frames(layout, 0)
        frame_index = segment_starts[:, None] + np.arange(layout.segment_frames)
        normalize = not self.uint8_video
        sample_starts = sync_sampling.segment_start_samples(layout, 0)
        inputs = {
            "audio": synchformer_audio_features_at(
                torch.from_numpy(samples), torch.as_tensor(sample_starts), layout.segment_samples
            )
        }
        if self.augment_per_segment:
            inputs["video"] = self.video_transform(frames[frame_index], rng, normalize=normalize)
        elif normalize:
            inputs["video"] = self.video_transform(frames, rng, segment_starts)
        else:
            inputs["video"] = self.video_transform(frames, rng, normalize=False)
            inputs["video_frame_index"] = torch.as_tensor(frame_index)
        return inputs

    def sample_window(self, index: int, rng: Optional[np.random.Generator]) -> ClipWindow:
        raise NotImplementedError

    def load_item(self, index: int) -> dict:
        entry = self.entries[index]
        rng = self.item_rng(index) if self.train else None
        window = self.sample_window(index, rng)
        return self.make_item(index, window, **self.load_segments(entry, window, rng))

    def make_item(self, index: int, window: ClipWindow, **inputs: torch.Tensor) -> dict:
        return {"id": index, **inputs, "offset_s": window.offset_s, "sync_target": window.synchronizable,
                "offset_target": self.offset_class(window.offset_s)}

    def offset_class(self, offset_s: float) -> int:
        return 0

    def collater(self, items: List[Optional[dict]]) -> dict:
        """Items -> a batch: ``net_input`` holds the stacked ``input_keys`` (B, ...) and, for
        uint8 stage-2 items, their ``video_frame_index`` (S, T) (set by the layout: the same for
        every item of a dataset)."""
        items = [item for item in items if item is not None]
        if not items:
            return {}
        net_input = {key: stack_in_memory_order([item[key] for item in items]) for key in self.input_keys}
        if "video_frame_index" in items[0]:
            net_input["video_frame_index"] = items[0]["video_frame_index"]
        return {
            "id": torch.tensor([item["id"] for item in items]),
            "nsentences": len(items),
            "ntokens": len(items),
            "net_input": net_input,
            "target": torch.tensor([item["offset_target"] for item in items]),
            "sync_target": torch.tensor([item["sync_target"] for item in items]),
            "offset_s": torch.tensor([item["offset_s"] for item in items]),
        }


class AVSegmentDataset(AVClipDataset):
    """Stage 1: S non-overlapping aligned segments from one random (training) or centred crop."""

    augment_per_segment = True

    def sample_window(self, index: int, rng: Optional[np.random.Generator]) -> ClipWindow:
        entry = self.entries[index]
        layout = self.layout
        slack = entry.num_video_frames - layout.span_frames
        if slack < 0:
            raise ValueError(
                f"{self.manifest_path} line {entry.line_number} ({entry.id}): {entry.num_video_frames} frames "
                f"is shorter than the {layout.span_frames} frames of {layout.num_segments} segments; "
                "filter short clips"
            )
        video_start = int(rng.integers(0, slack + 1)) if rng is not None else slack // 2
        audio_start = sync_sampling.audio_start_sample(video_start, 0.0, layout)
        audio_start = sync_sampling.jitter_samples(
            audio_start, layout.span_samples, entry.num_audio_samples, self.config.audio_jitter_s,
            layout.sample_rate, rng,
        )
        return ClipWindow(video_start, audio_start)


class AVOffsetDataset(AVClipDataset):
    """Stage 2: offset classification over a grid (and synchronizability)."""

    def __init__(
        self,
        manifest_path: str,
        config: ClipSamplingConfig,
        train: bool,
        crop_s: float = 5.0,
        max_offset_s: float = 2.0,
        num_offset_classes: int = 21,
        fixed_offsets: Optional[Dict[str, FixedOffset]] = None,
        synchronizability: bool = False,
        decoded_clips: Optional[Any] = None,
    ):
        super().__init__(manifest_path, config, train, decoded_clips)
        self.crop_frames = int(round(crop_s * self.layout.video_fps))
        self.grid = sync_sampling.offset_grid(max_offset_s, num_offset_classes)
        self.synchronizability = synchronizability
        if not train and fixed_offsets is None:
            raise ValueError(
                f"{manifest_path}: validation/test need fixed offsets so that numbers are comparable; "
                "write them once with `python -m preprocess.sync_offsets`"
            )
        if fixed_offsets is not None:
            missing = [entry.id for entry in self.entries if entry.id not in fixed_offsets]
            if missing:
                raise ValueError(
                    f"fixed offsets lack {len(missing)} clip(s) of {manifest_path} (first: {missing[0]}); "
                    "regenerate them with `python -m preprocess.sync_offsets`"
                )
        self.fixed_offsets = fixed_offsets
        self.no_overlap_offset_s = self.layout.span_s

    def sample_offset(self, entry: ManifestEntry, rng: np.random.Generator) -> Tuple[float, int, int]:
        """(offset seconds, video crop start frame, synchronizable 0/1) for a training item."""
        if self.synchronizability and rng.random() >= 0.5:
            offset_s = float(rng.choice([-self.no_overlap_offset_s, self.no_overlap_offset_s]))
            synchronizable = 0
        else:
            offset_s = float(rng.choice(self.grid))
            synchronizable = 1
        start = sync_sampling.sample_video_start_frame(
            entry.num_video_frames, self.crop_frames, offset_s, self.layout.video_fps, rng
        )
        return offset_s, start, synchronizable

    def sample_window(self, index: int, rng: Optional[np.random.Generator]) -> ClipWindow:
        """The fixed offset and crop of a listed clip, or a random grid offset and crop; the
        segments start inside the crop (random in training, centred otherwise); the audio
        start follows the offset plus the training jitter."""
        entry = self.entries[index]
        layout = self.layout
        if self.fixed_offsets is not None and entry.id in self.fixed_offsets:
            fixed = self.fixed_offsets[entry.id]
            offset_s = fixed.offset_s
            crop_start = int(round(fixed.video_start_s * layout.video_fps))
            synchronizable = int(abs(offset_s) <= self.grid[-1] + 1e-6)
        else:
            offset_s, crop_start, synchronizable = self.sample_offset(entry, rng)
        first_frame = sync_sampling.first_segment_frame(self.crop_frames, layout, self.train, rng)
        video_start = crop_start + first_frame
        audio_start = sync_sampling.audio_start_sample(video_start, offset_s, layout)
        audio_start = sync_sampling.jitter_samples(
            audio_start, layout.span_samples, entry.num_audio_samples, self.config.audio_jitter_s,
            layout.sample_rate, rng,
        )
        return ClipWindow(video_start, audio_start, offset_s, synchronizable)

    def offset_class(self, offset_s: float) -> int:
        return sync_sampling.offset_to_class(offset_s, self.grid)
