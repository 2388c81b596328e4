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
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from fairseq.data import data_utils

from avplugins.data.features import av_data2vec_audio_features
from avplugins.data.invalid_items import SKIP_HINT
from avplugins.data.manifest import ManifestEntry, select_labels, validate_manifest
from avplugins.data.media import MediaError, read_audio, read_video
from avplugins.data.noise import NoiseBank, mix_at_snr
from avplugins.data.row_dataset import ManifestRowDataset
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


class AVSpeechDataset(ManifestRowDataset):
    """Utterances of an AV-HuBERT manifest as fairseq batches (see the module docstring).

    Args:
        manifest_path: ``{split}.tsv``.
        modalities: streams to decode (``audio``, ``video``).
        train: random windows / crops / flips and per-epoch randomness; else deterministic.
        labels: optional token tensors (eos-terminated), one per manifest row (every line
            after the root line, including rows left out here).
        pad_index, eos_index: dictionary indices for collating labels.
        crop_size: mouth crop (pixels) taken from each frame.
        max_frames: longer utterances are cut to a window of this many frames (25 fps).
        min_frames: rows with fewer video frames are left out.
        noise: optional additive noise for the audio.
        skip_invalid: leave out malformed manifest rows and skip utterances that fail to
            load (logged and counted; see :mod:`avplugins.data.invalid_items`).
        seed: base seed of all randomness.
        image_size: resize the stored frames to this square size before cropping (None:
            as stored, e.g. 96 x 96 mouth ROIs).
        cache_media: keep every decoded utterance (and its clean audio features) in memory
            after its first use (per process: use it with ``dataset.num_workers=0``; for small
            corpora).
    """

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
        image_size: Optional[int] = None,
        cache_media: bool = False,
    ):
        super().__init__()
        self.manifest_path = manifest_path
        self.modalities = parse_modalities(modalities)
        self.train = train
        entries, report = validate_manifest(
            manifest_path, check_files=False, skip_invalid=skip_invalid, skip_hint=SKIP_HINT
        )
        num_rows = report.num_ok + report.num_skipped
        if labels is not None:
            if len(labels) != num_rows:
                raise ValueError(f"{manifest_path}: {num_rows} rows but {len(labels)} labels")
            labels = select_labels(entries, labels)
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
        self.seed = seed
        self.image_size = image_size
        self.cache_media = cache_media
        self._media_cache: Dict[int, Tuple[Optional[np.ndarray], Optional[np.ndarray]]] = {}
        self._feature_cache: Dict[Tuple[int, int, int], np.ndarray] = {}
        self.sizes = np.array(
            [min(e.num_video_frames, max_frames or e.num_video_frames) for e in self.entries], dtype=np.int64
        )
        self.init_skipping(skip_invalid, self.sizes)

    def _has_streams(self, entry: ManifestEntry) -> bool:
        return all(getattr(entry, f"{name}_path") for name in self.modalities)

    def num_tokens(self, index: int) -> int:
        return int(self.sizes[index])

    def size(self, index: int) -> int:
        return int(self.sizes[index])

    def ordered_indices(self) -> np.ndarray:
        if self.train:
            order = np.random.default_rng((self.seed, self.epoch)).permutation(len(self))
            return order[np.argsort(self.sizes[order], kind="stable")[::-1]]
        return np.argsort(self.sizes, kind="stable")[::-1]

    def batch_by_size(self, indices, max_tokens=None, max_sentences=None, required_batch_size_multiple=1):
        """fairseq's batching, plus the utterances it leaves out: with
        ``required_batch_size_multiple`` > 1 fairseq drops the last partial batch, which would
        silently shrink test sets in ``fairseq-generate`` (whose default multiple is 8)."""
        batches = super().batch_by_size(indices, max_tokens, max_sentences, required_batch_size_multiple)
        batched = set(np.concatenate(batches).tolist()) if len(batches) else set()
        leftover = [index for index in indices if index not in batched]
        if leftover:
            batches = list(batches) + [np.asarray(leftover, dtype=np.int64)]
        return batches

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
        frames, samples = self.read_media(index, start_frame, num_frames)
        item = {"id": index}
        if frames is not None:
            num_frames = len(frames)
            item["video"] = torch.from_numpy(
                av_data2vec_video_transform(frames, train=self.train, rng=rng, crop_size=self.crop_size)
            )
        if samples is not None:
            item["audio"] = torch.from_numpy(self.audio_features(index, start_frame, samples, num_frames, rng))
        item["num_frames"] = num_frames
        if self.labels is not None:
            item["target"] = self.labels[index]
        return item

    def decode(self, index: int, start_frame: int = 0, num_frames: Optional[int] = None):
        """The requested streams of utterance ``index`` from frame ``start_frame`` on
        (``num_frames`` frames, to the end when None).

        Returns:
            (frames (T, H, W) uint8 or None, samples (N,) float32 at 16 kHz or None).
        """
        entry = self.entries[index]
        start_s = start_frame / VIDEO_FPS
        duration_s = None if num_frames is None else num_frames / VIDEO_FPS
        frames = samples = None
        if "video" in self.modalities:
            size = None if self.image_size is None else (self.image_size, self.image_size)
            frames = read_video(
                entry.video_path, start_s=start_s, duration_s=duration_s, fps=VIDEO_FPS, gray=True, size=size
            )
            if len(frames) == 0:
                raise MediaError(entry.video_path, "no video frames decoded; the file may be empty or truncated")
        if "audio" in self.modalities:
            samples = read_audio(entry.audio_path, start_s=start_s, duration_s=duration_s, sample_rate=SAMPLE_RATE)
        return frames, samples

    def read_media(self, index: int, start_frame: int, num_frames: int):
        """:meth:`decode` of a window; with ``cache_media`` the whole utterance is decoded once
        and kept in memory (per process: use it with ``num_workers=0``)."""
        if not self.cache_media:
            return self.decode(index, start_frame, num_frames)
        if index not in self._media_cache:
            self._media_cache[index] = self.decode(index)
        frames, samples = self._media_cache[index]
        if frames is not None:
            frames = frames[start_frame : start_frame + num_frames]
        if samples is not None:
            samples_per_frame = SAMPLE_RATE // VIDEO_FPS
            samples = samples[start_frame * samples_per_frame : (start_frame + num_frames) * samples_per_frame]
        return frames, samples

    def audio_features(
        self, index: int, start_frame: int, samples: np.ndarray, num_frames: int, rng: np.random.Generator
    ) -> np.ndarray:
        """(num_frames, 104) features of ``samples``, after mixing in noise when configured.
        Clean features are deterministic, so ``cache_media`` keeps them too."""
        if self.noise is not None and rng.random() < self.noise.prob:
            snr_db = float(rng.choice(np.asarray(self.noise.snr_db, dtype=np.float64)))
            noisy = mix_at_snr(samples, self.noise.bank.draw(len(samples), rng), snr_db)
            return av_data2vec_audio_features(noisy, num_frames, SAMPLE_RATE)
        key = (index, start_frame, num_frames)
        if key not in self._feature_cache:
            features = av_data2vec_audio_features(samples, num_frames, SAMPLE_RATE)
            if not self.cache_media:
                return features
            self._feature_cache[key] = features
        return self._feature_cache[key]

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
