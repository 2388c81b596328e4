"""What the two Synchformer tasks share: data location, segment layout, video/audio sampling."""
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

from fairseq.dataclass import FairseqDataclass
from omegaconf import II, MISSING

from avplugins.data.sync_dataset import ClipSamplingConfig
from avplugins.data.sync_feature_cache import DecodedClips
from avplugins.data.sync_sampling import SegmentLayout
from avplugins.tasks._media_task import MediaTaskBase

logger = logging.getLogger(__name__)


@dataclass
class AVSyncDataConfig(FairseqDataclass):
    data: str = field(default=MISSING, metadata={"help": "folder with {split}.tsv manifests"})
    num_segments: int = field(default=14, metadata={"help": "segments per clip (S)"})
    segment_frames: int = field(default=16, metadata={"help": "video frames per segment (0.64 s at 25 fps)"})
    segment_stride_frames: int = field(default=8, metadata={"help": "frames between segment starts"})
    video_fps: int = field(default=25, metadata={"help": "video frame rate the clips are decoded at"})
    sample_rate: int = field(default=16000, metadata={"help": "audio sample rate the clips are decoded at"})
    crop_size: int = field(default=224, metadata={"help": "square spatial crop (pixels)"})
    resize_short_side: Optional[int] = field(
        default=None, metadata={"help": "resize frames so the short side has this size before cropping"}
    )
    audio_jitter_s: float = field(default=0.05, metadata={"help": "max audio jitter (seconds) in training"})
    sometimes_upscale_p: float = field(
        default=0.0, metadata={"help": "probability of a smaller random crop upscaled to crop_size"}
    )
    color_augment: bool = field(default=False, metadata={"help": "colour jitter and grayscale (p 0.2)"})
    skip_invalid: bool = field(
        default=False, metadata={"help": "skip (and count) clips that fail to decode instead of stopping"}
    )
    decoded_clips: Optional[str] = field(
        default=None,
        metadata={"help": "folder of clips decoded once (`python -m preprocess.cache_sync_features decode`); "
                  "the splits it holds are sliced from it instead of decoding the media files"},
    )
    seed: int = II("common.seed")
    train_subset: str = II("dataset.train_subset")


class AVSyncTaskBase(MediaTaskBase):
    cfg: AVSyncDataConfig

    @classmethod
    def setup_task(cls, cfg: AVSyncDataConfig, **kwargs):
        # the data folder is checked when a split is loaded: inference needs no data folder
        return cls(cfg)

    def segment_layout(self, stride_frames: int) -> SegmentLayout:
        cfg = self.cfg
        return SegmentLayout(
            num_segments=cfg.num_segments,
            segment_frames=cfg.segment_frames,
            stride_frames=stride_frames,
            video_fps=cfg.video_fps,
            sample_rate=cfg.sample_rate,
        )

    def sampling_config(self, stride_frames: int) -> ClipSamplingConfig:
        cfg = self.cfg
        return ClipSamplingConfig(
            layout=self.segment_layout(stride_frames),
            crop_size=cfg.crop_size,
            resize_short_side=cfg.resize_short_side,
            audio_jitter_s=cfg.audio_jitter_s,
            sometimes_upscale_p=cfg.sometimes_upscale_p,
            color_augment=cfg.color_augment,
            skip_invalid=cfg.skip_invalid,
            seed=cfg.seed,
            uint8_video=True,  # the Synchformer models normalise frames on their device
        )

    def manifest_path(self, split: str) -> str:
        path = os.path.join(self.cfg.data, f"{split}.tsv")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"no manifest {path} for split {split!r}; task.data={self.cfg.data!r} must be the folder "
                "holding {split}.tsv (see `avplugins-synth` or `python -m preprocess.make_manifest`)"
            )
        return path

    def decoded_clips(self, split: str) -> Optional[DecodedClips]:
        """The split's clips from ``decoded_clips`` when that folder holds it (None otherwise).

        Raises:
            ValueError: they were decoded with other settings than this task's.
        """
        if not self.cfg.decoded_clips or not DecodedClips.has_split(self.cfg.decoded_clips, split):
            return None
        store = DecodedClips(self.cfg.decoded_clips, split)
        expected = {"video_fps": self.cfg.video_fps, "sample_rate": self.cfg.sample_rate,
                    "resize_short_side": self.cfg.resize_short_side}
        differences = [f"task.{name}={value} (decoded: {getattr(store.meta, name)})"
                       for name, value in expected.items() if getattr(store.meta, name) != value]
        if differences:
            raise ValueError(f"{self.cfg.decoded_clips} was decoded with other settings: {', '.join(differences)}")
        logger.info("%s: clips sliced from %s", split, self.cfg.decoded_clips)
        return store

    def get_batch_iterator(self, dataset, *args, **kwargs):
        """fairseq's iterator with ``required_batch_size_multiple`` 1: items are whole clips, and
        fairseq's default multiple of 8 (``fairseq-validate``) would drop batches of fewer clips."""
        if len(args) >= 5:  # required_batch_size_multiple passed positionally
            args = (*args[:4], 1, *args[5:])
        else:
            kwargs["required_batch_size_multiple"] = 1
        return super().get_batch_iterator(dataset, *args, **kwargs)
