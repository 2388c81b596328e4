"""AV-data2vec datasets: audio-visual speech utterances from an AV-HuBERT manifest.

One item is an utterance (or, in pre-training, a random window of at most ``max_frames``
frames of it): 25 fps grayscale mouth crops and 104-d stacked log filterbanks aligned to them,
plus token targets when labels are given. Only the requested ``modalities`` are decoded.
Randomness (crops, flips, noise) comes from a generator seeded by (seed, epoch, index) in
training and by (seed, index) otherwise, so noisy test sets are the same in every run.

Batches: ``net_input = {"audio": (B, T, 104) | None, "video": (B, 1, T, 88, 88) | None,
"padding_mask": (B, T) bool (True = padding)}``; with labels also ``target`` (B, L) and
``net_input["prev_output_tokens"]`` (B, L) for teacher forcing.
"""
import logging
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
from fairseq.data import FairseqDataset, data_utils

from avplugins.data.features import av_data2vec_audio_features
from avplugins.data.manifest import ManifestEntry, read_manifest
from avplugins.data.media import MediaError, read_audio, read_video
from avplugins.data.noise import NoiseBank, mix_at_snr
from avplugins.data.transforms import MOUTH_CROP_SIZE, av_data2vec_video_transform

logger = logging.getLogger(__name__)

VIDEO_FPS = 25
SAMPLE_RATE = 16000
MODALITIES = ("audio", "video")


def parse_modalities(value) -> List[str]:
    """``"audio"``, ``"video"``, ``"audio,video"`` (or a list) -> ordered list; clear errors."""
    names = [name.strip() for name in (value.split(",") if isinstance(value, str) else value) if name.strip()]
    unknown = [name for name in names if name not in MODALITIES]
    if not names or unknown:
        raise ValueError(
            f"modalities={value!r}: use 'audio', 'video' or 'audio,video' (unknown: {unknown or 'none given'})"
        )
    return [name for name in MODALITIES if name in names]


@dataclass
class NoiseConfig:
    """Additive noise: ``snr_db`` values drawn uniformly per utterance, applied with ``prob``."""

    bank: NoiseBank
    snr_db: Sequence[float]
    prob: float = 1.0


class AVSpeechDataset(FairseqDataset):
    def __init__(
        self,
        manifest_path: str,
        modalities: Sequence[str],
        train: bool,
        labels: Optional[List[torch.Tensor]] = None,
        pad_index: int = 1,
        eos_index: int = 2,
        crop_size: int = MOUTH_CROP_SIZE,
        max_frames: Optional[int] = None,
        min_frames: int = 1,
        noise: Optional[NoiseConfig] = None,
        skip_invalid: bool = False,
        seed: int = 1,
    ):
        super().__init__()
        self.manifest_path = manifest_path
        self.modalities = parse_modalities(modalities)
        self.train = train
        _, entries = read_manifest(manifest_path)
        if labels is not None and len(labels) != len(entries):
            raise ValueError(f"{manifest_path}: {len(entries)} rows but {len(labels)} labels")
        keep = [i for i, entry in enumerate(entries) if self._has_streams(entry) and entry.num_video_frames >= min_frames]
        if len(keep) < len(entries):
            logger.warning(
                "%s: %d of %d rows left out (missing %s stream or shorter than %d frames)",
                manifest_path, len(entries) - len(keep), len(entries), "/".join(self.modalities), min_frames,
            )
        self.entries: List[ManifestEntry] = [entries[i] for i in keep]
        self.labels = None if labels is None else [labels[i] for i in keep]
        self.pad_index, self.eos_index = pad_index, eos_index
        self.crop_size = crop_size
        self.max_frames = max_frames
        self.noise = noise
        self.skip_invalid = skip_invalid
        self.seed = seed
        self.epoch = 1
        self.num_skipped = 0
        self.sizes = np.array(
            [min(e.num_video_frames, max_frames or e.num_video_frames) for e in self.entries], dtype=np.int64
        )

    def _has_streams(self, entry: ManifestEntry) -> bool:
        return all(getattr(entry, f"{name}_path") for name in self.modalities)

    def __len__(self) -> int:
        return len(self.entries)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def can_reuse_epoch_itr_across_epochs(self) -> bool:
        return False

    def num_tokens(self, index: int) -> int:
        return int(self.sizes[index])

    def size(self, index: int) -> int:
        return int(self.sizes[index])

    def ordered_indices(self) -> np.ndarray:
        if self.train:
            order = np.random.default_rng((self.seed, self.epoch)).permutation(len(self))
            return order[np.argsort(self.sizes[order], kind="stable")[::-1]]
        return np.argsort(self.sizes, kind="stable")[::-1]

    def item_rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, self.epoch, index) if self.train else (self.seed, index))

    def load_item(self, index: int) -> dict:
        entry = self.entries[index]
        rng = self.item_rng(index)
        num_frames = int(self.sizes[index])
        start_frame = 0
        if self.max_frames is not None and entry.num_video_frames > self.max_frames:
            # long utterances: a random window in training, the start otherwise
            start_frame = int(rng.integers(0, entry.num_video_frames - num_frames + 1)) if self.train else 0
        start_s, duration_s = start_frame / VIDEO_FPS, num_frames / VIDEO_FPS
        item = {"id": index}
        if "video" in self.modalities:
            frames = read_video(entry.video_path, start_s=start_s, duration_s=duration_s, fps=VIDEO_FPS, gray=True)
            if len(frames) == 0:
                raise MediaError(entry.video_path, "no video frames decoded; the file may be empty or truncated")
            num_frames = len(frames)
            item["video"] = torch.from_numpy(
                av_data2vec_video_transform(frames, train=self.train, rng=rng, crop_size=self.crop_size)
            )
        if "audio" in self.modalities:
            samples = read_audio(entry.audio_path, start_s=start_s, duration_s=duration_s, sample_rate=SAMPLE_RATE)
            if self.noise is not None and rng.random() < self.noise.prob:
                snr_db = float(rng.choice(np.asarray(self.noise.snr_db, dtype=np.float64)))
                samples = mix_at_snr(samples, self.noise.bank.draw(len(samples), rng), snr_db)
            item["audio"] = torch.from_numpy(av_data2vec_audio_features(samples, num_frames, SAMPLE_RATE))
        item["num_frames"] = num_frames
        if self.labels is not None:
            item["target"] = self.labels[index]
        return item

    def __getitem__(self, index: int) -> Optional[dict]:
        try:
            return self.load_item(index)
        except (MediaError, ValueError) as error:
            if not self.skip_invalid:
                raise
            self.num_skipped += 1
            logger.warning("skipping %s (%s); %d skipped so far", self.entries[index].id, error, self.num_skipped)
            return None

    def collater(self, items: List[Optional[dict]]) -> dict:
        items = [item for item in items if item is not None]
        if not items:
            return {}
        lengths = torch.tensor([item["num_frames"] for item in items])
        max_frames = int(lengths.max())
        padding_mask = torch.arange(max_frames)[None, :] >= lengths[:, None]
        net_input = {"audio": None, "video": None, "padding_mask": padding_mask}
        if "audio" in self.modalities:
            audio = torch.zeros(len(items), max_frames, items[0]["audio"].shape[-1])
            for row, item in enumerate(items):
                audio[row, : item["num_frames"]] = item["audio"]
            net_input["audio"] = audio
        if "video" in self.modalities:
            height, width = items[0]["video"].shape[-2:]
            video = torch.zeros(len(items), 1, max_frames, height, width)
            for row, item in enumerate(items):
                video[row, 0, : item["num_frames"]] = item["video"]
            net_input["video"] = video
        batch = {
            "id": torch.tensor([item["id"] for item in items]),
            "nsentences": len(items),
            "net_input": net_input,
            "frame_lengths": lengths,
        }
        if self.labels is not None:
            targets = [item["target"] for item in items]
            batch["target"] = data_utils.collate_tokens(targets, self.pad_index, self.eos_index, left_pad=False)
            batch["target_lengths"] = torch.tensor([len(t) for t in targets])
            batch["ntokens"] = int(batch["target_lengths"].sum())
            net_input["prev_output_tokens"] = data_utils.collate_tokens(
                targets, self.pad_index, self.eos_index, left_pad=False, move_eos_to_beginning=True
            )
        else:
            batch["ntokens"] = int(lengths.sum())
        return batch
