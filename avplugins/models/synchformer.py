"""Synchformer stage 2: frozen AST + Motionformer towers and the synchronisation module.

``model(video=v, audio=a)`` with ``v (B, S, T, 3, H, W)`` normalised frames and
``a (B, S, 1, 128, 66)`` normalised log-mels returns ``offset_logits (B, n_offsets)`` and, with
the synchronizability head, ``sync_logits (B, 2)``. ``forward_features`` (the towers) and
``forward_head`` (projections + sync module) are separate so that tower features can be cached
or shared between overlapping windows.

The towers come from a stage-1 checkpoint (``pretrained_towers``); with ``freeze_towers`` they
get no gradients and stay in eval mode whatever ``model.train()`` says (dropout and drop-path
off, as the official stage 2).
"""
import logging
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
from fairseq.models import BaseFairseqModel, register_model
from omegaconf import II

from avplugins.checkpoint import load_checkpoint_state
from avplugins.models._synchformer_towers import TINY_TOWERS, SynchformerTowersConfig, audio_args, visual_args
from avplugins.models._variants import register_variant
from avplugins.modules.synchformer_net import SynchformerNet

logger = logging.getLogger(__name__)

TOWER_PREFIXES = ("net.visual.", "net.audio.")


@dataclass
class SynchformerConfig(SynchformerTowersConfig):
    sync_dim: int = field(default=768, metadata={"help": "sync module width"})
    sync_depth: int = field(default=3, metadata={"help": "sync module blocks"})
    sync_heads: int = field(default=8, metadata={"help": "sync module attention heads"})
    sync_dropout: float = field(default=0.1, metadata={"help": "sync module dropout"})
    num_offset_classes: int = II("task.num_offset_classes")
    offset_head: bool = field(default=True, metadata={"help": "classify the offset over the grid"})
    sync_head: bool = field(default=False, metadata={"help": "add the binary synchronizability head"})
    pretrained_towers: Optional[str] = field(
        default=None, metadata={"help": "stage-1 (synchformer_segment_clip) checkpoint to take the towers from"}
    )
    freeze_towers: bool = field(default=True, metadata={"help": "keep the towers frozen and in eval mode"})
    video_drop_path: float = field(default=0.0, metadata={"help": "Motionformer stochastic depth (frozen: unused)"})


def tower_state_dict(checkpoint_path: str) -> Dict[str, torch.Tensor]:
    """The ``net.visual.*`` / ``net.audio.*`` weights of a stage-1 or stage-2 checkpoint."""
    model_state = load_checkpoint_state(checkpoint_path).get("model")
    if model_state is None:
        raise ValueError(f"{checkpoint_path}: no 'model' weights; give a checkpoint written by this project")
    towers = {key: value for key, value in model_state.items() if key.startswith(TOWER_PREFIXES)}
    if not towers:
        raise ValueError(
            f"{checkpoint_path}: no tower weights (keys starting with {TOWER_PREFIXES}); expected a "
            "synchformer_segment_clip (stage 1) checkpoint, or import an official one with avplugins-convert"
        )
    return towers


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
        return model

    def load_towers(self, checkpoint_path: str) -> None:
        towers = tower_state_dict(checkpoint_path)
        missing, unexpected = self.load_state_dict(towers, strict=False)
        missing_tower_keys = [key for key in missing if key.startswith(TOWER_PREFIXES)]
        if missing_tower_keys or unexpected:
            raise ValueError(
                f"{checkpoint_path}: towers do not match this model's config (missing {missing_tower_keys[:3]}, "
                f"unexpected {unexpected[:3]}); use the same tower sizes as in stage 1"
            )
        logger.info("loaded %d tower tensors from %s", len(towers), checkpoint_path)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.cfg.freeze_towers:
            self.net.visual.eval()
            self.net.audio.eval()
        return self

    def forward_features(self, video: torch.Tensor, audio: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Tower features: ``vfeats (B, S, tv, Dv)``, ``afeats (B, S, ta, Da)``."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.freeze_towers):
            return self.net.forward_features(video, audio)

    def forward_head(self, vfeats: torch.Tensor, afeats: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Tower features -> ``offset_logits`` and/or ``sync_logits``."""
        return self.net.forward_head(vfeats, afeats)

    def forward(self, video: torch.Tensor, audio: torch.Tensor, **unused) -> Dict[str, torch.Tensor]:
        return self.forward_head(*self.forward_features(video, audio))


register_variant(SynchformerModel, "synchformer", "base", {})
register_variant(SynchformerModel, "synchformer", "tiny", {**TINY_TOWERS, "sync_dim": 64, "sync_depth": 2, "sync_heads": 4})
