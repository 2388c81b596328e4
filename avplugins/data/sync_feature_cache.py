"""Cached tower features for Synchformer stage 2 (the towers are frozen there, so their outputs
for a given segment never change).

A cache holds, for every clip of a split and every segment start on the video frame grid, the
Motionformer features of the T frames starting at frame ``f`` and the AST features of the audio
segment starting at sample ``f * samples_per_frame``; a stage-2 item then gathers its S video
and S audio rows instead of decoding and running the towers. Features are computed as at test
time (centre crop, no flip). Differences from training on decoded clips: no random crop or flip,
and the audio jitter is rounded to whole frames (40 ms at 25 fps).

Layout of a cache folder::

    meta.json                      what the features were computed with (see CacheMeta)
    {split}.index.tsv              id <TAB> first_row <TAB> num_starts
    {split}.video.npy              float16 (rows, tv, Dv), memory-mapped
    {split}.audio.npy              float16 (rows, ta, Da)

Row ``first_row + f`` of a clip holds the segments starting at frame ``f``
(``0 <= f < num_starts``); a clip that failed to decode has ``num_starts`` 0.
"""
import csv
import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from avplugins.data import sync_sampling
from avplugins.data.features import synchformer_audio_features_at
from avplugins.data.manifest import ManifestEntry
from avplugins.data.media import MediaError
from avplugins.data.sync_dataset import AVClipDataset, AVOffsetDataset, ClipWindow

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
META_FILE = "meta.json"


@dataclass(frozen=True)
class CacheMeta:
    """What a cache's features depend on; a task refuses a cache whose values differ from its own.

    Attributes:
        segment_frames, video_fps, sample_rate: segment length (frames) and the clocks.
        crop_size, resize_short_side: the video input (centre crop of the resized frames).
        tower_fingerprint: :func:`tower_fingerprint` of the towers that computed the features.
        source_checkpoint: the checkpoint they came from (informative).
        video_tokens, video_dim, audio_tokens, audio_dim: feature shapes per segment.
    """

    segment_frames: int
    video_fps: int
    sample_rate: int
    crop_size: int
    resize_short_side: Optional[int]
    tower_fingerprint: str
    source_checkpoint: str
    video_tokens: int
    video_dim: int
    audio_tokens: int
    audio_dim: int
    version: int = CACHE_VERSION

    def save(self, cache_dir: str) -> None:
        with open(os.path.join(cache_dir, META_FILE), "w", encoding="utf-8") as handle:
            json.dump(dataclasses.asdict(self), handle, indent=1)

    @classmethod
    def load(cls, cache_dir: str) -> "CacheMeta":
        path = os.path.join(cache_dir, META_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{cache_dir} is not a feature cache (no {META_FILE}); write one with "
                "`python -m preprocess.cache_sync_features`"
            )
        with open(path, encoding="utf-8") as handle:
            values = json.load(handle)
        if values.get("version") != CACHE_VERSION:
            raise ValueError(f"{path}: cache version {values.get('version')}, expected {CACHE_VERSION}; rebuild it")
        return cls(**values)

    def differences(self, other: "CacheMeta", ignore: Tuple[str, ...] = ("source_checkpoint",)) -> List[str]:
        """``name: ours != theirs`` for every field that differs."""
        return [
            f"{field.name}: {getattr(self, field.name)!r} != {getattr(other, field.name)!r}"
            for field in dataclasses.fields(self)
            if field.name not in ignore and getattr(self, field.name) != getattr(other, field.name)
        ]


def tower_fingerprint(*towers: nn.Module) -> str:
    """SHA-256 over the names, shapes and float32 values of the towers' weights (hex, 16 chars)."""
    digest = hashlib.sha256()
    for tower in towers:
        for name, tensor in sorted(tower.state_dict().items()):
            digest.update(f"{name}{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def num_segment_starts(entry: ManifestEntry, layout: sync_sampling.SegmentLayout) -> int:
    """Segment starts f (frames) of a clip for which both the T frames from f and the audio
    segment from sample ``f * samples_per_frame`` lie inside the clip (0 if none)."""
    video_starts = entry.num_video_frames - layout.segment_frames + 1
    audio_starts = (entry.num_audio_samples - layout.segment_samples) // layout.samples_per_frame + 1
    return max(0, min(video_starts, audio_starts))


def clip_segment_batches(
    reader: AVClipDataset, entry: ManifestEntry, num_starts: int, batch_segments: int
) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Decode a clip once and yield the inputs of its segments at every start, in order.

    Yields:
        ``video (b, T, 3, H, W)`` centre-cropped normalised frames and ``audio (b, 1, 128, 66)``
        normalised log-mels, for consecutive start frames, ``b <= batch_segments``.
    """
    layout = reader.layout
    num_frames = num_starts - 1 + layout.segment_frames
    num_samples = (num_starts - 1) * layout.samples_per_frame + layout.segment_samples
    frames, samples = reader.decode(entry, 0, num_frames, 0, num_samples)
    video = reader.video_transform(frames, rng=None)  # (frames, 3, H, W)
    samples = torch.from_numpy(samples)
    for first in range(0, num_starts, batch_segments):
        starts = np.arange(first, min(first + batch_segments, num_starts))
        frame_index = torch.as_tensor(starts[:, None] + np.arange(layout.segment_frames))
        audio_starts = torch.as_tensor(starts * layout.samples_per_frame)
        yield video[frame_index], synchformer_audio_features_at(samples, audio_starts, layout.segment_samples)


@torch.no_grad()
def build_feature_cache(
    visual: nn.Module,
    audio: nn.Module,
    reader: AVClipDataset,
    cache_dir: str,
    split: str,
    meta: CacheMeta,
    batch_segments: int = 128,
    device: str = "cpu",
) -> List[Tuple[str, str]]:
    """Compute and write the features of every clip of ``reader`` (split ``split``).

    Args:
        visual, audio: the towers ((B, S, T, 3, H, W) -> (B, S, tv, Dv) and
            (B, S, 1, F, Ta) -> (B, S, ta, Da)); run in eval mode.
        reader: decodes the split's clips (its config sets crop and resize; ``train=False``).
        meta: must match ``cache_dir/meta.json`` if the folder already holds a cache.
        batch_segments: segments per tower forward.
        device: where the towers are (inputs are moved there, features back to the CPU).
    Returns:
        (clip id, reason) of the clips left out (too short, or failed to decode).
    """
    os.makedirs(cache_dir, exist_ok=True)
    if os.path.isfile(os.path.join(cache_dir, META_FILE)):
        differences = CacheMeta.load(cache_dir).differences(meta)
        if differences:
            raise ValueError(
                f"{cache_dir} holds features computed differently ({'; '.join(differences)}); "
                "write this split to a new folder"
            )
    visual.eval()
    audio.eval()
    layout = reader.layout
    counts = [num_segment_starts(entry, layout) for entry in reader.entries]
    total = int(sum(counts))
    video_rows = np.lib.format.open_memmap(
        os.path.join(cache_dir, f"{split}.video.npy"), "w+", np.float16, (total, meta.video_tokens, meta.video_dim)
    )
    audio_rows = np.lib.format.open_memmap(
        os.path.join(cache_dir, f"{split}.audio.npy"), "w+", np.float16, (total, meta.audio_tokens, meta.audio_dim)
    )
    index, skipped, first_row = [], [], 0
    for clip_number, (entry, num_starts) in enumerate(zip(reader.entries, counts)):
        written = 0
        if num_starts == 0:
            skipped.append((entry.id, f"shorter than one segment ({layout.segment_frames} frames)"))
        else:
            try:
                for video, audio_input in clip_segment_batches(reader, entry, num_starts, batch_segments):
                    rows = slice(first_row + written, first_row + written + len(video))
                    video_rows[rows] = visual(video[None].to(device))[0].cpu().numpy()
                    audio_rows[rows] = audio(audio_input[None].to(device))[0].cpu().numpy()
                    written += len(video)
            except MediaError as error:
                skipped.append((entry.id, str(error)))
                written = 0
        index.append((entry.id, first_row, written))
        first_row += num_starts
        if (clip_number + 1) % 50 == 0:
            logger.info("%s: %d / %d clips", split, clip_number + 1, len(reader.entries))
    video_rows.flush()
    audio_rows.flush()
    with open(os.path.join(cache_dir, f"{split}.index.tsv"), "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["id", "first_row", "num_starts"])
        writer.writerows(index)
    meta.save(cache_dir)
    return skipped


class FeatureCache:
    """Read access to one split of a cache; the arrays are memory-mapped on first use (so that
    each data-loader worker maps its own)."""

    def __init__(self, cache_dir: str, split: str):
        self.cache_dir = cache_dir
        self.split = split
        self.meta = CacheMeta.load(cache_dir)
        index_path = os.path.join(cache_dir, f"{split}.index.tsv")
        if not os.path.isfile(index_path):
            raise FileNotFoundError(
                f"feature cache {cache_dir} has no split {split!r} ({index_path} is missing); add it with "
                f"`python -m preprocess.cache_sync_features ... --splits {split}`"
            )
        with open(index_path, newline="", encoding="utf-8") as handle:
            self.index: Dict[str, Tuple[int, int]] = {
                row["id"]: (int(row["first_row"]), int(row["num_starts"]))
                for row in csv.DictReader(handle, delimiter="\t")
            }
        self._arrays: Optional[Tuple[np.ndarray, np.ndarray]] = None

    @staticmethod
    def has_split(cache_dir: str, split: str) -> bool:
        return os.path.isfile(os.path.join(cache_dir, f"{split}.index.tsv"))

    def arrays(self) -> Tuple[np.ndarray, np.ndarray]:
        if self._arrays is None:
            self._arrays = tuple(
                np.load(os.path.join(self.cache_dir, f"{self.split}.{kind}.npy"), mmap_mode="r")
                for kind in ("video", "audio")
            )
        return self._arrays

    def num_starts(self, clip_id: str) -> int:
        return self.index.get(clip_id, (0, 0))[1]

    def gather(
        self, clip_id: str, video_starts: np.ndarray, audio_starts: np.ndarray
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Features of the segments starting at ``video_starts`` / ``audio_starts`` (frames, (S,)).

        Returns:
            ``vfeats (S, tv, Dv)``, ``afeats (S, ta, Da)`` float32.
        Raises:
            ValueError: the clip is not cached or a start lies outside it.
        """
        first_row, num_starts = self.index.get(clip_id, (0, 0))
        starts = np.concatenate([video_starts, audio_starts])
        if num_starts == 0 or starts.min() < 0 or starts.max() >= num_starts:
            raise ValueError(
                f"feature cache {self.cache_dir} ({self.split}): clip {clip_id} has {num_starts} cached "
                f"segment starts, asked for frames {starts.min()}..{starts.max()}; rebuild the cache for "
                "this manifest"
            )
        video_rows, audio_rows = self.arrays()
        return (
            torch.from_numpy(np.asarray(video_rows[first_row + video_starts], dtype=np.float32)),
            torch.from_numpy(np.asarray(audio_rows[first_row + audio_starts], dtype=np.float32)),
        )


class CachedOffsetDataset(AVOffsetDataset):
    """:class:`AVOffsetDataset` whose items carry cached tower features ``vfeats (S, tv, Dv)`` and
    ``afeats (S, ta, Da)`` instead of frames and log-mels; the same windows, offsets and targets."""

    input_keys = ("vfeats", "afeats")

    def __init__(self, *args, cache: FeatureCache, **kwargs):
        super().__init__(*args, **kwargs)
        self.cache = cache

    def cached_starts(self, window: ClipWindow) -> Tuple[np.ndarray, np.ndarray]:
        """(S,) video and audio segment start frames of ``window`` (audio rounded to a frame)."""
        layout = self.layout
        audio_start_frame = int(round(window.audio_start_sample / layout.samples_per_frame))
        return (
            sync_sampling.segment_start_frames(layout, window.video_start_frame),
            sync_sampling.segment_start_frames(layout, audio_start_frame),
        )

    def load_item(self, index: int) -> dict:
        rng = self.item_rng(index) if self.train else None
        window = self.sample_window(index, rng)
        vfeats, afeats = self.cache.gather(self.entries[index].id, *self.cached_starts(window))
        return self.make_item(index, window, vfeats=vfeats, afeats=afeats)


# ----------------------------------------------------------------------------- decoded clips
DECODED_META_FILE = "decoded.json"


@dataclass(frozen=True)
class DecodedMeta:
    """How the clips of a :class:`DecodedClips` store were decoded."""

    video_fps: int
    sample_rate: int
    resize_short_side: Optional[int]
    frame_height: int
    frame_width: int
    version: int = CACHE_VERSION


class DecodedClips:
    """Every clip of a split decoded once, for datasets that would otherwise decode the same
    files again at every epoch: RGB frames uint8 ``(frames, H, W, 3)`` at the decode size and
    audio float32 ``(samples,)``, memory-mapped. Slices of it equal what
    :meth:`AVClipDataset.decode` returns for the same window.

    Layout: ``decoded.json`` (:class:`DecodedMeta`), ``{split}.clips.tsv`` (id, first_frame,
    num_frames, first_sample, num_samples), ``{split}.frames.npy``, ``{split}.samples.npy``.
    """

    def __init__(self, store_dir: str, split: str):
        self.store_dir = store_dir
        self.split = split
        meta_path = os.path.join(store_dir, DECODED_META_FILE)
        index_path = os.path.join(store_dir, f"{split}.clips.tsv")
        for path in (meta_path, index_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{path} is missing: decode split {split!r} into {store_dir} with "
                    f"`python -m preprocess.cache_sync_features decode DATA {store_dir} --splits {split}`"
                )
        with open(meta_path, encoding="utf-8") as handle:
            self.meta = DecodedMeta(**json.load(handle))
        with open(index_path, newline="", encoding="utf-8") as handle:
            self.index: Dict[str, Tuple[int, int, int, int]] = {
                row["id"]: tuple(int(row[key]) for key in ("first_frame", "num_frames", "first_sample", "num_samples"))
                for row in csv.DictReader(handle, delimiter="\t")
            }
        self._arrays: Optional[Tuple[np.ndarray, np.ndarray]] = None

    @staticmethod
    def has_split(store_dir: str, split: str) -> bool:
        return os.path.isfile(os.path.join(store_dir, f"{split}.clips.tsv"))

    def arrays(self) -> Tuple[np.ndarray, np.ndarray]:
        if self._arrays is None:
            self._arrays = tuple(
                np.load(os.path.join(self.store_dir, f"{self.split}.{kind}.npy"), mmap_mode="r")
                for kind in ("frames", "samples")
            )
        return self._arrays

    def window(
        self, clip_id: str, video_start_frame: int, num_frames: int, audio_start_sample: int, num_samples: int
    ) -> Tuple[np.ndarray, np.ndarray]:
        """Frames ``[video_start_frame, + num_frames)`` (uint8 (T, H, W, 3)) and samples
        ``[audio_start_sample, + num_samples)`` (float32 (N,)) of a clip, fewer at its end.

        Raises:
            MediaError: the clip is not in the store (it failed to decode when the store was made).
        """
        if clip_id not in self.index:
            raise MediaError(clip_id, f"not in the decoded clips of {self.store_dir} ({self.split}); it failed to "
                             "decode when they were written, or the manifest changed since: rewrite them")
        first_frame, clip_frames, first_sample, clip_samples = self.index[clip_id]
        frames, samples = self.arrays()
        frame_stop = min(video_start_frame + num_frames, clip_frames)
        sample_stop = min(audio_start_sample + num_samples, clip_samples)
        return (  # copies: the caller may write to them
            np.array(frames[first_frame + video_start_frame:first_frame + max(frame_stop, video_start_frame)]),
            np.array(samples[first_sample + audio_start_sample:first_sample + max(sample_stop, audio_start_sample)]),
        )


def write_decoded_clips(reader: AVClipDataset, store_dir: str, split: str) -> List[Tuple[str, str]]:
    """Decode every clip of ``reader`` whole (at its decode size) into a :class:`DecodedClips` store.

    Returns:
        (clip id, reason) of the clips that failed to decode (left out of the store).
    Raises:
        ValueError: clips decode to different frame sizes, or ``store_dir`` holds clips decoded
            with other settings.
    """
    os.makedirs(store_dir, exist_ok=True)
    layout = reader.layout
    entries = reader.entries
    frames = samples = meta = None
    rows, skipped = [], []
    first_frame = first_sample = 0
    for entry in entries:
        try:
            clip_frames, clip_samples = reader.decode(entry, 0, entry.num_video_frames, 0, entry.num_audio_samples)
        except MediaError as error:
            skipped.append((entry.id, str(error)))
            continue
        if meta is None:
            meta = DecodedMeta(layout.video_fps, layout.sample_rate, reader.config.resize_short_side,
                               *clip_frames.shape[1:3])
            _check_same_meta(store_dir, meta)
            frames = np.lib.format.open_memmap(
                os.path.join(store_dir, f"{split}.frames.npy"), "w+", np.uint8,
                (sum(e.num_video_frames for e in entries), meta.frame_height, meta.frame_width, 3),
            )
            samples = np.lib.format.open_memmap(
                os.path.join(store_dir, f"{split}.samples.npy"), "w+", np.float32,
                (sum(e.num_audio_samples for e in entries),),
            )
        if clip_frames.shape[1:3] != (meta.frame_height, meta.frame_width):
            raise ValueError(
                f"{entry.video_path}: frames of {clip_frames.shape[1:3]} where earlier clips have "
                f"{(meta.frame_height, meta.frame_width)}; set a resize_short_side that gives every clip one size"
            )
        frames[first_frame:first_frame + len(clip_frames)] = clip_frames
        samples[first_sample:first_sample + len(clip_samples)] = clip_samples
        rows.append((entry.id, first_frame, len(clip_frames), first_sample, len(clip_samples)))
        first_frame += len(clip_frames)
        first_sample += len(clip_samples)
    if meta is None:
        raise ValueError(f"{reader.manifest_path}: no clip could be decoded ({skipped[:1]})")
    frames.flush()
    samples.flush()
    with open(os.path.join(store_dir, f"{split}.clips.tsv"), "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["id", "first_frame", "num_frames", "first_sample", "num_samples"])
        writer.writerows(rows)
    with open(os.path.join(store_dir, DECODED_META_FILE), "w", encoding="utf-8") as handle:
        json.dump(dataclasses.asdict(meta), handle, indent=1)
    return skipped


def _check_same_meta(store_dir: str, meta: DecodedMeta) -> None:
    path = os.path.join(store_dir, DECODED_META_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            existing = DecodedMeta(**json.load(handle))
        if existing != meta:
            raise ValueError(f"{store_dir} holds clips decoded with other settings ({existing}); use another folder")
