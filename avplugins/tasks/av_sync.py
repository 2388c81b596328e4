"""Synchformer stage 2: offset classification (and synchronizability) on a grid of offsets.

Training draws a random grid offset per clip; validation and test read FIXED offsets from
``{offsets_dir}/{split}_offsets.csv`` (written once by ``python -m preprocess.sync_offsets``), so
that numbers are comparable across runs.

With ``feature_cache`` (written by ``python -m preprocess.cache_sync_features``) the splits the
cache holds are read as cached tower features (``vfeats``/``afeats``) instead of decoded clips:
the frozen towers then never run during training, and the checkpoint still holds them, so it
works on raw clips afterwards.
"""
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

from fairseq.tasks import register_task
from omegaconf import open_dict

from avplugins.data.sync_dataset import AVOffsetDataset, read_fixed_offsets
from avplugins.data.sync_feature_cache import CachedOffsetDataset, CacheMeta, FeatureCache, tower_fingerprint
from avplugins.tasks._av_sync_base import AVSyncDataConfig, AVSyncTaskBase

logger = logging.getLogger(__name__)


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
    feature_cache: Optional[str] = field(
        default=None,
        metadata={"help": "folder of cached tower features (preprocess/cache_sync_features.py); the splits "
                  "it holds are read from it instead of decoding clips (needs frozen towers)"},
    )


@register_task("av_sync", dataclass=AVSyncConfig)
class AVSyncTask(AVSyncTaskBase):
    cfg: AVSyncConfig

    def build_model(self, cfg, from_checkpoint: bool = False):
        """Build the model; from a checkpoint, skip loading pretrained parts and the aligned init
        (the checkpoint's own weights replace them). Otherwise check that a feature cache was
        computed by these towers."""
        if from_checkpoint:
            with open_dict(cfg):
                cfg.pretrained_towers = None
                cfg.pretrained_sync = None
                cfg.sync_init = "official"
        model = super().build_model(cfg, from_checkpoint)
        if self.cfg.feature_cache and not from_checkpoint:
            self.check_feature_cache(model)
        return model

    def check_feature_cache(self, model) -> None:
        """Raises ValueError when the cache's features cannot be this model's tower outputs."""
        cache_dir = self.cfg.feature_cache
        if not model.cfg.freeze_towers:
            raise ValueError(
                f"task.feature_cache={cache_dir!r} holds features of frozen towers: set model.freeze_towers=true "
                "or drop the cache"
            )
        meta = CacheMeta.load(cache_dir)
        fingerprint = tower_fingerprint(model.net.visual, model.net.audio)
        if meta.tower_fingerprint != fingerprint:
            raise ValueError(
                f"feature cache {cache_dir} was computed by other tower weights (from {meta.source_checkpoint}, "
                f"fingerprint {meta.tower_fingerprint}) than model.pretrained_towers={model.cfg.pretrained_towers!r} "
                f"({fingerprint}); rebuild the cache from that checkpoint"
            )
        layout = self.segment_layout(self.cfg.segment_stride_frames)
        expected = {
            "segment_frames": layout.segment_frames, "video_fps": layout.video_fps,
            "sample_rate": layout.sample_rate, "crop_size": self.cfg.crop_size,
            "resize_short_side": self.cfg.resize_short_side,
        }
        differences = [f"task.{name}={value} (cache: {getattr(meta, name)})"
                       for name, value in expected.items() if getattr(meta, name) != value]
        if differences:
            raise ValueError(f"feature cache {cache_dir} was computed with other inputs: {', '.join(differences)}")

    def load_dataset(self, split: str, epoch: int = 1, combine: bool = False, **kwargs):
        train = self.is_train_split(split)
        offsets_path = os.path.join(self.cfg.offsets_dir or self.cfg.data, f"{split}_offsets.csv")
        fixed_offsets = None if train else read_fixed_offsets(offsets_path) if os.path.isfile(offsets_path) else None
        arguments = dict(
            manifest_path=self.manifest_path(split),
            config=self.sampling_config(self.cfg.segment_stride_frames),
            train=train,
            crop_s=self.cfg.crop_s,
            max_offset_s=self.cfg.max_offset_s,
            num_offset_classes=self.cfg.num_offset_classes,
            fixed_offsets=fixed_offsets,
            synchronizability=self.cfg.synchronizability,
        )
        if self.cfg.feature_cache and FeatureCache.has_split(self.cfg.feature_cache, split):
            logger.info("%s: cached tower features from %s", split, self.cfg.feature_cache)
            self.datasets[split] = CachedOffsetDataset(**arguments, cache=FeatureCache(self.cfg.feature_cache, split))
        else:
            self.datasets[split] = AVOffsetDataset(**arguments, decoded_clips=self.decoded_clips(split))
