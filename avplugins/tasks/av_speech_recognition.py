"""Labelled audio-visual speech recognition (ASR / VSR / AVSR) with sentencepiece targets.

``{split}.wrd`` transcripts are encoded with the sentencepiece model of the data folder and
``dict.wrd.txt``; ``modalities`` picks the input streams for training, validation and
``fairseq-generate``. Optional noise (``noise_manifest`` + ``noise_snr_db``) is mixed into the
audio, for noise-robust training or a noisy test set (seeded per utterance: the same noise in
every run). Inference never drops long clips.
"""
import glob
import logging
import os
from dataclasses import dataclass, field
from typing import List, Optional

import sentencepiece
import torch
from fairseq.data import Dictionary
from fairseq.sequence_generator import SequenceGenerator
from fairseq.tasks import register_task
from omegaconf import open_dict

from avplugins.data.av_speech_dataset import AVSpeechDataset, NoiseConfig, parse_modalities
from avplugins.data.manifest import count_rows, read_labels
from avplugins.data.noise import NoiseBank
from avplugins.tasks._av_speech_base import AVSpeechDataConfig, AVSpeechTaskBase

logger = logging.getLogger(__name__)


@dataclass
class AVSpeechRecognitionConfig(AVSpeechDataConfig):
    modalities: Optional[str] = field(
        default=None,
        metadata={
            "help": "input streams: 'audio', 'video' or 'audio,video' (default: when decoding a "
            "checkpoint, the streams it was fine-tuned on; otherwise audio,video)"
        },
    )
    labels: str = field(default="wrd", metadata={"help": "label file extension: {split}.{labels}"})
    tokenizer_model: Optional[str] = field(
        default=None, metadata={"help": "sentencepiece model (default: the one *.model in task.data)"}
    )
    noise_manifest: Optional[str] = field(
        default=None, metadata={"help": ".tsv whose audio files are the noise to mix in"}
    )
    noise_snr_db: str = field(
        default="0", metadata={"help": "SNR(s) in dB, comma separated; one is drawn per utterance"}
    )
    noise_prob: float = field(default=1.0, metadata={"help": "probability that an utterance gets noise"})
    noise_babble_voices: int = field(
        default=1, metadata={"help": "noise waveforms summed per draw (e.g. 30 for babble from speech)"}
    )
    noise_splits: str = field(
        default="", metadata={"help": "comma-separated splits that get noise (empty: all splits)"}
    )


def find_tokenizer_model(data_dir: str) -> str:
    models = sorted(glob.glob(os.path.join(data_dir, "*.model")))
    if len(models) != 1:
        raise FileNotFoundError(
            f"found {len(models)} sentencepiece models in {data_dir} ({models}); "
            "set task.tokenizer_model to the one the dictionary was built with"
        )
    return models[0]


class AVSequenceGenerator(SequenceGenerator):
    """fairseq's beam search for inputs given as separate ``audio`` / ``video`` streams.

    fairseq's generator reads the batch size and source length from ``net_input["source"]``;
    our net input has two optional streams, so a (B, T) view of the padding mask stands in
    as that source. The encoder ignores it.
    """

    def _generate(self, sample, **kwargs):
        net_input = sample["net_input"]
        sample = {**sample, "net_input": {**net_input, "source": net_input["padding_mask"]}}
        return super()._generate(sample, **kwargs)


@register_task("av_speech_recognition", dataclass=AVSpeechRecognitionConfig)
class AVSpeechRecognitionTask(AVSpeechTaskBase):
    cfg: AVSpeechRecognitionConfig

    def __init__(self, cfg: AVSpeechRecognitionConfig, dictionary: Dictionary, tokenizer_model: str):
        super().__init__(cfg)
        self.dictionary = dictionary
        self.tokenizer_model = tokenizer_model
        self.tokenizer = sentencepiece.SentencePieceProcessor(model_file=tokenizer_model)
        self.noise_bank: Optional[NoiseBank] = None

    @classmethod
    def setup_task(cls, cfg: AVSpeechRecognitionConfig, **kwargs):
        cls.check_data_dir(cfg)
        dict_path = os.path.join(cfg.data, f"dict.{cfg.labels}.txt")
        if not os.path.isfile(dict_path):
            raise FileNotFoundError(
                f"no dictionary {dict_path}; build it with `python -m preprocess.build_vocab`"
            )
        dictionary = Dictionary.load(dict_path)
        tokenizer_model = cfg.tokenizer_model or find_tokenizer_model(cfg.data)
        logger.info("dictionary: %d types; tokenizer %s", len(dictionary), tokenizer_model)
        return cls(cfg, dictionary, tokenizer_model)

    @property
    def target_dictionary(self) -> Dictionary:
        return self.dictionary

    def encode_transcript(self, text: str) -> torch.Tensor:
        """Transcript -> (L + 1,) token ids ending in eos; pieces missing from the dictionary
        become <unk> (counted in the dataset log)."""
        pieces = self.tokenizer.encode(text, out_type=str)
        return self.dictionary.encode_line(" ".join(pieces), add_if_not_exist=False, append_eos=True).long()

    def load_labels(self, split: str, num_rows: int) -> List[torch.Tensor]:
        labels_path = os.path.join(self.cfg.data, f"{split}.{self.cfg.labels}")
        transcripts = read_labels(labels_path, num_rows)
        encoded = [self.encode_transcript(text) for text in transcripts]
        num_unknown = sum(int((tokens == self.dictionary.unk()).sum()) for tokens in encoded)
        if num_unknown:
            logger.warning("%s: %d pieces are not in the dictionary and became <unk>", labels_path, num_unknown)
        return encoded

    def noise_for(self, split: str) -> Optional[NoiseConfig]:
        cfg = self.cfg
        if cfg.noise_manifest is None:
            return None
        splits = [name.strip() for name in cfg.noise_splits.split(",") if name.strip()]
        if splits and split not in splits:
            return None
        if self.noise_bank is None:
            self.noise_bank = NoiseBank(cfg.noise_manifest, babble_voices=cfg.noise_babble_voices)
        try:
            snr_db = [float(value) for value in cfg.noise_snr_db.split(",")]
        except ValueError:
            raise ValueError(f"task.noise_snr_db={cfg.noise_snr_db!r}: give numbers in dB separated by commas") from None
        return NoiseConfig(self.noise_bank, snr_db, cfg.noise_prob)

    def modalities_for(self, task_cfg=None) -> List[str]:
        """The streams to load: ``task.modalities`` when set, else those of ``task_cfg`` (the
        checkpoint's task config that ``fairseq-generate`` passes), else audio and video."""
        if self.cfg.modalities:
            return self.modalities
        trained = getattr(task_cfg, "modalities", None) if task_cfg is not None else None
        return parse_modalities(trained) if trained else self.modalities

    def load_dataset(self, split: str, epoch: int = 1, combine: bool = False, task_cfg=None, **kwargs):
        manifest = self.manifest_path(split)
        train = self.is_train_split(split)
        modalities = self.modalities_for(task_cfg)
        logger.info("%s: input streams %s", split, "+".join(modalities))
        self.datasets[split] = AVSpeechDataset(
            manifest,
            modalities=modalities,
            train=train,
            labels=self.load_labels(split, count_rows(manifest)),
            pad_index=self.dictionary.pad(),
            eos_index=self.dictionary.eos(),
            max_frames=self.cfg.max_frames if train else None,
            noise=self.noise_for(split),
            **self.dataset_options(),
        )

    def build_model(self, cfg, from_checkpoint: bool = False):
        """fairseq's ``build_model``, then the config values the model settled at build time
        (e.g. ``w2v_args`` and the shapes read from a pre-training checkpoint) are written
        back into ``cfg``: fairseq builds the model from a merged copy, and the checkpoint
        saves ``cfg``, which must describe the model without the pre-training file."""
        model = super().build_model(cfg, from_checkpoint)
        updates = getattr(model, "config_updates", {})
        if updates:
            with open_dict(cfg):
                for name, value in updates.items():
                    cfg[name] = value
        return model

    def build_generator(self, models, args, seq_gen_cls=None, extra_gen_cls_kwargs=None, **kwargs):
        return super().build_generator(
            models, args, seq_gen_cls=seq_gen_cls or AVSequenceGenerator,
            extra_gen_cls_kwargs=extra_gen_cls_kwargs, **kwargs,
        )
