"""Synchformer stage 1: clips -> S non-overlapping aligned segments for segment-level InfoNCE."""
from dataclasses import dataclass, field

from fairseq.tasks import register_task

from avplugins.data.sync_dataset import AVSegmentDataset
from avplugins.tasks._av_sync_base import AVSyncDataConfig, AVSyncTaskBase


@dataclass
class AVSyncPretrainingConfig(AVSyncDataConfig):
    segment_stride_frames: int = field(
        default=16, metadata={"help": "frames between segment starts (= segment_frames: no overlap)"}
    )


@register_task("av_sync_pretraining", dataclass=AVSyncPretrainingConfig)
class AVSyncPretrainingTask(AVSyncTaskBase):
    def load_dataset(self, split: str, epoch: int = 1, combine: bool = False, **kwargs):
        self.datasets[split] = AVSegmentDataset(
            self.manifest_path(split),
            self.sampling_config(self.cfg.segment_stride_frames),
            train=self.is_train_split(split),
            decoded_clips=self.decoded_clips(split),
        )
