"""What the two AV-data2vec tasks share: data location, modalities, crops, skipping."""
import os
from dataclasses import dataclass, field
from typing import Optional

from fairseq.dataclass import FairseqDataclass
from omegaconf import II, MISSING

from avplugins.data.av_speech_dataset import parse_modalities
from avplugins.tasks._media_task import MediaTaskBase


DEFAULT_MODALITIES = "audio,video"


@dataclass
class AVSpeechDataConfig(FairseqDataclass):
    data: str = field(default=MISSING, metadata={"help": "folder with {split}.tsv manifests"})
    modalities: str = field(
        default=DEFAULT_MODALITIES, metadata={"help": "input streams: 'audio', 'video' or 'audio,video'"}
    )
    crop_size: int = field(default=88, metadata={"help": "mouth crop (pixels) taken from the 96x96 ROI"})
    image_size: Optional[int] = field(
        default=None, metadata={"help": "resize the stored frames to this square size before cropping"}
    )
    cache_media: bool = field(
        default=False,
        metadata={"help": "keep decoded utterances in memory (small corpora; with dataset.num_workers=0)"},
    )
    max_frames: Optional[int] = field(
        default=None, metadata={"help": "training crops longer clips to this many frames (25 fps)"}
    )
    min_frames: int = field(default=1, metadata={"help": "rows shorter than this are left out"})
    skip_invalid: bool = field(
        default=False, metadata={"help": "skip (and count) utterances that fail to decode instead of stopping"}
    )
    seed: int = II("common.seed")
    train_subset: str = II("dataset.train_subset")


class AVSpeechTaskBase(MediaTaskBase):
    """Data folder checks, manifest paths and the dataset options both tasks pass on."""

    cfg: AVSpeechDataConfig

    def __init__(self, cfg: AVSpeechDataConfig, **kwargs):
        super().__init__(cfg)
        self.modalities = parse_modalities(cfg.modalities or DEFAULT_MODALITIES)

    @classmethod
    def check_data_dir(cls, cfg: AVSpeechDataConfig) -> None:
        if not os.path.isdir(cfg.data):
            raise FileNotFoundError(
                f"task.data={cfg.data!r} is not a folder; point it at the folder holding train.tsv/valid.tsv"
            )

    def manifest_path(self, split: str) -> str:
        path = os.path.join(self.cfg.data, f"{split}.tsv")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no manifest {path} for split {split!r}")
        return path

    def dataset_options(self) -> dict:
        """Keyword arguments of :class:`AVSpeechDataset` that come straight from the config."""
        cfg = self.cfg
        return {
            "crop_size": cfg.crop_size,
            "image_size": cfg.image_size,
            "cache_media": cfg.cache_media,
            "min_frames": cfg.min_frames,
            "skip_invalid": cfg.skip_invalid,
            "seed": cfg.seed,
        }
