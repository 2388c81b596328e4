"""Synchformer stage 2: offset classification (and synchronizability) on a grid of offsets.

Training draws a random grid offset per clip; validation and test read FIXED offsets from
``{offsets_dir}/{split}_offsets.csv`` (written once by ``python -m preprocess.sync_offsets``), so
that numbers are comparable across runs.
"""
import os
from dataclasses import dataclass, field
from typing import Optional

from fairseq.tasks import register_task

from avplugins.data.sync_dataset import AVOffsetDataset, read_fixed_offsets
from avplugins.tasks._av_sync_base import AVSyncDataConfig, AVSyncTaskBase


@dataclass
class AVSyncConfig(AVSyncDataConfig):
    crop_s: float = field(default=5.0, metadata={"help": "length of the video and audio crops (seconds)"})
    max_offset_s: float = field(default=2.0, metadata={"help": "largest offset of the grid (seconds)"})
    num_offset_classes: int = field(default=21, metadata={"help": "offset classes: -max..+max evenly"})
    synchronizability: bool = field(
        default=False,
        metadata={"help": "train on 50 % grid offsets and 50 % offsets of +-the segment span (no overlap)"},
    )
    offsets_dir: Optional[str] = field(
        default=None, metadata={"help": "folder of {split}_offsets.csv (default: task.data)"}
    )


@register_task("av_sync", dataclass=AVSyncConfig)
class AVSyncTask(AVSyncTaskBase):
    cfg: AVSyncConfig

    def load_dataset(self, split: str, epoch: int = 1, combine: bool = False, **kwargs):
        train = self.is_train_split(split)
        offsets_path = os.path.join(self.cfg.offsets_dir or self.cfg.data, f"{split}_offsets.csv")
        fixed_offsets = None if train else read_fixed_offsets(offsets_path) if os.path.isfile(offsets_path) else None
        self.datasets[split] = AVOffsetDataset(
            self.manifest_path(split),
            self.sampling_config(self.cfg.segment_stride_frames),
            train=train,
            crop_s=self.cfg.crop_s,
            max_offset_s=self.cfg.max_offset_s,
            num_offset_classes=self.cfg.num_offset_classes,
            fixed_offsets=fixed_offsets,
            synchronizability=self.cfg.synchronizability,
        )
