"""Synchformer datasets: clips from an AV-HuBERT manifest cut into segments.

- :class:`AVSegmentDataset` (stage 1): one crop of S non-overlapping segments, audio and video
  aligned (up to a small training jitter).
- :class:`AVOffsetDataset` (stage 2): a video crop and an audio crop shifted by an offset from a
  grid, cut into S overlapping segments; random offsets in training, fixed ones (a csv written
  once by ``preprocess/sync_offsets.py``) for validation and test. ``synchronizability=True``
  draws half of the training offsets from the grid and half as +-crop length (no overlap).

Items are ``{"id", "video" (S, T, 3, H, W) float32 normalised, "audio" (S, 1, 128, 66) float32
normalised log-mels, "offset_s", "offset_target", "sync_target"}``. Every random choice of an item
comes from a generator seeded by (seed, epoch, index), so a resumed run sees the same samples.
"""
import csv
import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from fairseq.data import FairseqDataset

from avplugins.data import sync_sampling
from avplugins.data.features import synchformer_audio_features
from avplugins.data.manifest import ManifestEntry, read_manifest
from avplugins.data.media import MediaError, read_audio, read_video
from avplugins.data.sync_sampling import SegmentLayout
from avplugins.data.transforms import synchformer_video_transform

logger = logging.getLogger(__name__)


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


class _AVClipDataset(FairseqDataset):
    """Manifest access, window decoding, segmentation and collation shared by both stages."""

    def __init__(self, manifest_path: str, config: ClipSamplingConfig, train: bool):
        super().__init__()
        self.manifest_path = manifest_path
        self.config = config
        self.layout = config.layout
        self.train = train
        _, self.entries = read_manifest(manifest_path)
        self.epoch = 1
        self.num_skipped = 0

    def __len__(self) -> int:
        return len(self.entries)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def can_reuse_epoch_itr_across_epochs(self) -> bool:
        return False

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

    def load_segments(
        self,
        entry: ManifestEntry,
        video_start_frame: int,
        audio_start_sample: int,
        rng: Optional[np.random.Generator],
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Decode the segment span starting at ``video_start_frame`` (video) and
        ``audio_start_sample`` (audio) and cut it into segments.

        Returns:
            video (S, T, 3, H, W) float32 normalised, audio (S, 1, 128, 66) float32.
        """
        layout = self.layout
        span_samples = layout.span_samples
        frames = read_video(
            entry.video_path,
            start_s=video_start_frame / layout.video_fps,
            duration_s=layout.span_frames / layout.video_fps,
            fps=layout.video_fps,
        )
        samples = read_audio(
            entry.audio_path,
            start_s=audio_start_sample / layout.sample_rate,
            duration_s=span_samples / layout.sample_rate,
            sample_rate=layout.sample_rate,
        )
        if len(frames) < layout.span_frames or len(samples) < span_samples:
            raise MediaError(
                entry.video_path,
                f"decoded {len(frames)} frames / {len(samples)} samples where the manifest row "
                f"(line {entry.line_number}) promised at least {layout.span_frames} / {span_samples}; "
                "recount the manifest with preprocess/count_frames.py",
            )
        video = synchformer_video_transform(
            frames,
            crop_size=self.config.crop_size,
            train=rng is not None,
            rng=rng,
            color_augment=self.config.color_augment,
            small_crop_p=self.config.sometimes_upscale_p,
            short_side=self.config.resize_short_side,
        )  # (span_frames, 3, H, W)
        frame_starts = sync_sampling.segment_start_frames(layout, 0)
        frame_index = torch.as_tensor(frame_starts[:, None] + np.arange(layout.segment_frames))
        sample_starts = sync_sampling.segment_start_samples(layout, 0)
        sample_index = torch.as_tensor(sample_starts[:, None] + np.arange(layout.segment_samples))
        audio = synchformer_audio_features(torch.from_numpy(samples)[sample_index])
        return video[frame_index], audio

    def load_item(self, index: int) -> dict:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Optional[dict]:
        try:
            return self.load_item(index)
        except (MediaError, ValueError) as error:
            if not self.config.skip_invalid:
                raise
            self.num_skipped += 1
            logger.warning(
                "skipping %s (%s); %d skipped so far", self.entries[index].id, error, self.num_skipped
            )
            return None

    def collater(self, items: List[Optional[dict]]) -> dict:
        items = [item for item in items if item is not None]
        if not items:
            return {}
        return {
            "id": torch.tensor([item["id"] for item in items]),
            "nsentences": len(items),
            "ntokens": len(items),
            "net_input": {
                "video": torch.stack([item["video"] for item in items]),
                "audio": torch.stack([item["audio"] for item in items]),
            },
            "target": torch.tensor([item["offset_target"] for item in items]),
            "sync_target": torch.tensor([item["sync_target"] for item in items]),
            "offset_s": torch.tensor([item["offset_s"] for item in items]),
        }


class AVSegmentDataset(_AVClipDataset):
    """Stage 1: S non-overlapping aligned segments from one random (training) or centred crop."""

    def load_item(self, index: int) -> dict:
        entry = self.entries[index]
        layout = self.layout
        rng = self.item_rng(index) if self.train else None
        slack = entry.num_video_frames - layout.span_frames
        if slack < 0:
            raise ValueError(
                f"{entry.id} (line {entry.line_number}): {entry.num_video_frames} frames is shorter than "
                f"the {layout.span_frames} frames of {layout.num_segments} segments; filter short clips"
            )
        video_start = int(rng.integers(0, slack + 1)) if rng is not None else slack // 2
        audio_start = sync_sampling.audio_start_sample(video_start, 0.0, layout)
        audio_start = sync_sampling.jitter_samples(
            audio_start, layout.span_samples, entry.num_audio_samples, self.config.audio_jitter_s,
            layout.sample_rate, rng,
        )
        video, audio = self.load_segments(entry, video_start, audio_start, rng)
        return {"id": index, "video": video, "audio": audio, "offset_s": 0.0,
                "offset_target": 0, "sync_target": 1}


class AVOffsetDataset(_AVClipDataset):
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
    ):
        super().__init__(manifest_path, config, train)
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

    def load_item(self, index: int) -> dict:
        entry = self.entries[index]
        layout = self.layout
        rng = self.item_rng(index) if self.train else None
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
        video, audio = self.load_segments(entry, video_start, audio_start, rng)
        return {
            "id": index,
            "video": video,
            "audio": audio,
            "offset_s": offset_s,
            "offset_target": sync_sampling.offset_to_class(offset_s, self.grid),
            "sync_target": synchronizable,
        }
