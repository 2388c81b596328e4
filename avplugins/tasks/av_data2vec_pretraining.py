"""AV-data2vec pre-training on unlabelled audio-visual speech (random crops of long clips)."""
from dataclasses import dataclass, field
from typing import Optional

from fairseq.tasks import register_task

from avplugins.data.av_speech_dataset import AVSpeechDataset
from avplugins.tasks._av_speech_base import AVSpeechDataConfig, AVSpeechTaskBase


@dataclass
class AVData2VecPretrainingConfig(AVSpeechDataConfig):
    max_frames: Optional[int] = field(
        default=500, metadata={"help": "training crops longer clips to this many frames (25 fps)"}
    )


@register_task("av_data2vec_pretraining", dataclass=AVData2VecPretrainingConfig)
class AVData2VecPretrainingTask(AVSpeechTaskBase):
    @classmethod
    def setup_task(cls, cfg: AVData2VecPretrainingConfig, **kwargs):
        cls.check_data_dir(cfg)
        return cls(cfg)

    def load_dataset(self, split: str, epoch: int = 1, combine: bool = False, **kwargs):
        train = self.is_train_split(split)
        self.datasets[split] = AVSpeechDataset(
            self.manifest_path(split),
            modalities=self.modalities,
            train=train,
            max_frames=self.cfg.max_frames,
            **self.dataset_options(),
        )
