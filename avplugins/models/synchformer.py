"""Synchformer stage 2: frozen AST + Motionformer towers and the synchronisation module.

``model(video=v, audio=a)`` with ``v (B, S, T, 3, H, W)`` normalised frames and
``a (B, S, 1, 128, 66)`` normalised log-mels returns ``offset_logits (B, n_offsets)`` and, with
the synchronizability head, ``sync_logits (B, 2)``. ``v`` may also be the datasets' uint8 frames,
(B, S, T, 3, H, W) or (B, F, 3, H, W) with ``video_frame_index`` (S, T), normalised here on the
model's device (``transforms.normalized_segments``). ``model(vfeats=..., afeats=...)`` takes
tower features instead (e.g. from a feature cache, ``avplugins.data.sync_feature_cache``).
``forward_features`` (the towers) and ``forward_head`` (projections + sync module) are
separate so that tower features can be cached or shared between overlapping windows.

The towers come from a stage-1 checkpoint (``pretrained_towers``); with ``freeze_towers`` they
get no gradients and stay in eval mode whatever ``model.train()`` says (dropout and drop-path
off, as the official stage 2). ``pretrained_sync`` starts the projections and the sync module
from a stage-2 checkpoint too (the synchronizability fine-tune).
"""
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from fairseq.dataclass import ChoiceEnum
from fairseq.models import BaseFairseqModel, register_model
from omegaconf import II, OmegaConf

from avplugins.checkpoint import load_checkpoint_state
from avplugins.data import sync_sampling
from avplugins.data.transforms import normalized_segments
from avplugins.models._synchformer_towers import (
    TINY_TOWERS,
    SynchformerTowersConfig,
    audio_args,
    tower_config_differences,
    visual_args,
)
from avplugins.models._variants import register_variant
from avplugins.modules.synchformer_net import SynchformerNet

logger = logging.getLogger(__name__)

TOWER_PREFIXES = ("net.visual.", "net.audio.")
SYNC_PREFIXES = ("net.vproj.", "net.aproj.", "net.sync.")
SYNC_POSITIONS = "net.sync.pos_embed"


def is_head(key: str) -> bool:
    """Whether a state-dict key belongs to an output head of the sync module."""
    return key.startswith(("net.sync.offset_head.", "net.sync.sync_head."))


@dataclass
class SynchformerConfig(SynchformerTowersConfig):
    sync_dim: int = field(default=768, metadata={"help": "sync module width"})
    sync_depth: int = field(default=3, metadata={"help": "sync module blocks"})
    sync_heads: int = field(default=8, metadata={"help": "sync module attention heads"})
    sync_dropout: float = field(default=0.1, metadata={"help": "sync module dropout"})
    sync_init: ChoiceEnum(["official", "aligned"]) = field(
        default="official",
        metadata={"help": "'official': the paper's random init; 'aligned': start the sync module as an offset "
                  "detector (cross-modal attention, time ramps; needs sync_dim >= feature dim + 4), which "
                  "skips the long plateau at loss ln(21) (SyncTransformer.init_aligned)"},
    )
    num_offset_classes: int = II("task.num_offset_classes")
    max_offset_s: float = II("task.max_offset_s")
    segment_stride_frames: int = II("task.segment_stride_frames")
    video_fps: int = II("task.video_fps")
    offset_head: bool = field(default=True, metadata={"help": "classify the offset over the grid"})
    sync_head: bool = field(default=False, metadata={"help": "add the binary synchronizability head"})
    pretrained_towers: Optional[str] = field(
        default=None,
        metadata={"help": "stage-1 (synchformer_segment_clip) or stage-2 checkpoint to take the towers from"},
    )
    pretrained_sync: Optional[str] = field(
        default=None,
        metadata={"help": "stage-2 checkpoint to start the projections and sync module from (position "
                  "embedding trimmed to this model's tokens; heads it lacks start fresh)"},
    )
    freeze_towers: bool = field(default=True, metadata={"help": "keep the towers frozen and in eval mode"})
    video_drop_path: float = field(default=0.0, metadata={"help": "Motionformer stochastic depth (frozen: unused)"})


def checkpoint_model_part(checkpoint_path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(model state dict, model config with interpolations resolved) of a checkpoint of ours."""
    state = load_checkpoint_state(checkpoint_path)
    if state.get("model") is None:
        raise ValueError(f"{checkpoint_path}: no 'model' weights; give a checkpoint written by this project")
    model_cfg: Dict[str, Any] = {}
    if state.get("cfg"):
        cfg = OmegaConf.create(state["cfg"])
        if cfg.get("model") is not None:
            model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    return state["model"], model_cfg


def aligned_class_shifts(cfg: SynchformerConfig) -> List[int]:
    """Per offset class, the shift in segments from an audio segment to the visual segment that
    shows the same moment (``offset / segment stride``), for ``SynchformerNet.init_aligned``.

    Raises:
        ValueError: the grid step is not the segment stride (the names of the fields to set).
    """
    grid = sync_sampling.offset_grid(cfg.max_offset_s, cfg.num_offset_classes)
    stride_s = cfg.segment_stride_frames / cfg.video_fps
    shifts = grid / stride_s
    if not np.allclose(shifts, np.round(shifts), atol=1e-6):
        step_s = float(grid[1] - grid[0])
        raise ValueError(
            f"model.sync_init=aligned needs the offset grid step ({step_s:g} s) to be a multiple of the segment "
            f"stride ({cfg.segment_stride_frames} frames = {stride_s:g} s): set task.segment_stride_frames="
            f"{step_s * cfg.video_fps:g} (or another divisor), or use model.sync_init=official"
        )
    return [int(shift) for shift in np.round(shifts)]


@register_model("synchformer", dataclass=SynchformerConfig)
class SynchformerModel(BaseFairseqModel):
    def __init__(self, cfg: SynchformerConfig, net: SynchformerNet):
        super().__init__()
        self.cfg = cfg
        self.net = net
        if cfg.freeze_towers:
            for tower in (net.visual, net.audio):
                tower.requires_grad_(False)
                tower.eval()

    @classmethod
    def build_model(cls, cfg: SynchformerConfig, task=None):
        net = SynchformerNet.build(
            num_segments=cfg.num_segments,
            visual_args=visual_args(cfg),
            audio_args=audio_args(cfg),
            sync_args=dict(
                dim=cfg.sync_dim, depth=cfg.sync_depth, num_heads=cfg.sync_heads,
                num_offset_classes=cfg.num_offset_classes if cfg.offset_head else 0,
                sync_head=cfg.sync_head, dropout=cfg.sync_dropout, attn_dropout=cfg.sync_dropout,
            ),
        )
        model = cls(cfg, net)
        if cfg.pretrained_towers:
            model.load_towers(cfg.pretrained_towers)
        if cfg.sync_init == "aligned":
            net.init_aligned(aligned_class_shifts(cfg))
        if cfg.pretrained_sync:
            model.load_sync_module(cfg.pretrained_sync)
        return model

    def load_towers(self, checkpoint_path: str) -> None:
        """Copy the towers of a checkpoint of ours (stage 1 or 2) into this model.

        Raises:
            ValueError: no tower weights, or the checkpoint's towers were built differently
                (the message names the fields to set).
        """
        model_state, model_cfg = checkpoint_model_part(checkpoint_path)
        towers = {key: value for key, value in model_state.items() if key.startswith(TOWER_PREFIXES)}
        if not towers:
            raise ValueError(
                f"{checkpoint_path}: no tower weights (keys starting with {TOWER_PREFIXES}); expected a "
                "synchformer_segment_clip (stage 1) checkpoint, or import an official one with avplugins-convert"
            )
        differences = tower_config_differences(self.cfg, model_cfg)
        if differences:
            raise ValueError(
                f"{checkpoint_path}: its towers were built with other settings; set "
                f"{', '.join(differences)} as in that checkpoint"
            )
        self._load_part(towers, TOWER_PREFIXES, checkpoint_path)
        logger.info("loaded %d tower tensors from %s", len(towers), checkpoint_path)

    def load_sync_module(self, checkpoint_path: str) -> None:
        """Copy the projections and sync module of a stage-2 checkpoint into this model, the
        position embedding trimmed to this model's tokens (as the official synchronizability
        fine-tune); heads the checkpoint lacks keep their fresh initialisation."""
        model_state, _ = checkpoint_model_part(checkpoint_path)
        part = {key: value for key, value in model_state.items() if key.startswith(SYNC_PREFIXES)}
        if SYNC_POSITIONS not in part:
            raise ValueError(f"{checkpoint_path}: no sync module ({SYNC_POSITIONS}); give a stage-2 checkpoint")
        num_tokens = self.net.sync.pos_embed.shape[1]
        if part[SYNC_POSITIONS].shape[1] < num_tokens:
            raise ValueError(
                f"{checkpoint_path}: its sync module has {part[SYNC_POSITIONS].shape[1]} positions, fewer than "
                f"the {num_tokens} tokens of this model; use at most as many segments as that model"
            )
        part[SYNC_POSITIONS] = part[SYNC_POSITIONS][:, :num_tokens]
        own = self.state_dict()
        part = {key: value for key, value in part.items() if not is_head(key) or key in own}
        self._load_part(part, SYNC_PREFIXES, checkpoint_path, may_miss=is_head)
        logger.info("loaded %d sync-module tensors from %s", len(part), checkpoint_path)

    def _load_part(
        self, part: Dict[str, torch.Tensor], prefixes: Tuple[str, ...], checkpoint_path: str,
        may_miss: Callable[[str], bool] = lambda key: False,
    ) -> None:
        """Load ``part``, which must hold every weight of ours under ``prefixes`` (except those
        ``may_miss``), each with our shape."""
        own = self.state_dict()
        missing = [key for key in own if key.startswith(prefixes) and key not in part and not may_miss(key)]
        unexpected = [key for key in part if key not in own]
        mismatched = [key for key in part if key in own and part[key].shape != own[key].shape]
        if missing or unexpected or mismatched:
            raise ValueError(
                f"{checkpoint_path}: weights do not fit this model (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}, other shapes {mismatched[:3]}); use the sizes that checkpoint was trained with"
            )
        self.load_state_dict(part, strict=False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.cfg.freeze_towers:
            self.net.visual.eval()
            self.net.audio.eval()
        return self

    def video_input(self, video: torch.Tensor, video_frame_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``video`` as :func:`normalized_segments` takes it -> normalised (B, S, T, 3, H, W) in the
        towers' dtype (already normalised floats as given)."""
        return normalized_segments(video, video_frame_index, dtype=next(self.net.visual.parameters()).dtype)

    def forward_features(
        self, video: torch.Tensor, audio: torch.Tensor, video_frame_index: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Tower features: ``vfeats (B, S, tv, Dv)``, ``afeats (B, S, ta, Da)``; ``video`` as
        :meth:`video_input` takes it."""
        video = self.video_input(video, video_frame_index)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.freeze_towers):
            return self.net.forward_features(video, audio)

    def forward_head(self, vfeats: torch.Tensor, afeats: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Tower features -> ``offset_logits`` and/or ``sync_logits``."""
        return self.net.forward_head(vfeats, afeats)

    def forward(
        self,
        video: Optional[torch.Tensor] = None,
        audio: Optional[torch.Tensor] = None,
        vfeats: Optional[torch.Tensor] = None,
        afeats: Optional[torch.Tensor] = None,
        video_frame_index: Optional[torch.Tensor] = None,
        **unused,
    ) -> Dict[str, torch.Tensor]:
        """Either ``video`` and ``audio`` (model inputs; uint8 ``video`` with an optional
        ``video_frame_index`` is normalised here) or ``vfeats`` and ``afeats`` (tower features,
        see :meth:`forward_features`)."""
        if vfeats is None or afeats is None:
            if video is None or audio is None:
                raise ValueError("SynchformerModel needs video= and audio=, or vfeats= and afeats=")
            # normalised here so that forward_features is called as (video, audio), as wrappers of it expect
            vfeats, afeats = self.forward_features(self.video_input(video, video_frame_index), audio)
        return self.forward_head(vfeats, afeats)


register_variant(SynchformerModel, "synchformer", "base", {})
register_variant(SynchformerModel, "synchformer", "tiny", {**TINY_TOWERS, "sync_dim": 64, "sync_depth": 2, "sync_heads": 4})
