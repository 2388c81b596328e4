"""Configuration shared by both Synchformer models: the two feature towers."""
from dataclasses import dataclass, field, fields
from typing import Any, List, Mapping

from fairseq.dataclass import FairseqDataclass
from omegaconf import II


@dataclass
class SynchformerTowersConfig(FairseqDataclass):
    num_segments: int = II("task.num_segments")
    segment_frames: int = II("task.segment_frames")
    image_size: int = II("task.crop_size")
    # Motionformer (video)
    video_patch_size: int = field(default=16, metadata={"help": "spatial patch size (pixels)"})
    video_tubelet_size: int = field(default=2, metadata={"help": "frames per tubelet"})
    video_dim: int = field(default=768, metadata={"help": "Motionformer width"})
    video_depth: int = field(default=12, metadata={"help": "Motionformer blocks"})
    video_heads: int = field(default=12, metadata={"help": "Motionformer attention heads"})
    video_drop_path: float = field(default=0.2, metadata={"help": "Motionformer stochastic depth"})
    # AST (audio)
    mel_bins: int = field(default=128, metadata={"help": "log-mel bins of the audio input"})
    audio_time_frames: int = field(default=66, metadata={"help": "spectrogram frames per segment"})
    audio_patch_size: int = field(default=16, metadata={"help": "AST patch size"})
    audio_stride: int = field(default=10, metadata={"help": "AST patch stride (frequency and time)"})
    audio_dim: int = field(default=768, metadata={"help": "AST width"})
    audio_depth: int = field(default=12, metadata={"help": "AST blocks"})
    audio_heads: int = field(default=12, metadata={"help": "AST attention heads"})
    audio_drop_path: float = field(default=0.0, metadata={"help": "AST stochastic depth"})


# Fields that shape the towers' weights or what they compute (the number of segments and the
# stochastic depth do neither), so two configs agreeing on them can share tower weights.
TOWER_SHAPE_FIELDS = tuple(
    f.name for f in fields(SynchformerTowersConfig)
    if f.name not in ("_name", "num_segments", "video_drop_path", "audio_drop_path")
)


def tower_config_differences(ours: Any, theirs: Mapping[str, Any]) -> List[str]:
    """``model.<field>=<ours> (checkpoint: <theirs>)`` for each of :data:`TOWER_SHAPE_FIELDS`
    that ``theirs`` records with another value (fields it lacks are not compared)."""
    return [
        f"model.{name}={getattr(ours, name)} (checkpoint: {theirs[name]})"
        for name in TOWER_SHAPE_FIELDS
        if name in theirs and theirs[name] != getattr(ours, name)
    ]


def visual_args(cfg: SynchformerTowersConfig) -> dict:
    return dict(
        image_size=cfg.image_size, patch_size=cfg.video_patch_size, num_frames=cfg.segment_frames,
        tubelet_size=cfg.video_tubelet_size, dim=cfg.video_dim, depth=cfg.video_depth,
        num_heads=cfg.video_heads, drop_path=cfg.video_drop_path,
    )


def audio_args(cfg: SynchformerTowersConfig) -> dict:
    return dict(
        num_mel_bins=cfg.mel_bins, time_frames=cfg.audio_time_frames, patch_size=cfg.audio_patch_size,
        freq_stride=cfg.audio_stride, time_stride=cfg.audio_stride, dim=cfg.audio_dim,
        depth=cfg.audio_depth, num_heads=cfg.audio_heads, drop_path=cfg.audio_drop_path,
    )


# The CPU-test/demo tower sizes (the same code path as the paper's, only smaller).
TINY_TOWERS = dict(
    video_dim=64, video_depth=2, video_heads=4, video_drop_path=0.0,
    audio_dim=64, audio_depth=2, audio_heads=4,
)
