"""Synchformer stage 1: AST + Motionformer towers trained with segment-level InfoNCE.

``model(video, audio)`` returns per-segment embeddings (the mean of a segment's tokens,
L2-normalised) of both streams and the temperature; the ``segment_infonce`` criterion builds
the (B*S) x (B*S) similarities. The temperature is learnable, initialised at 0.07 and clamped
to [0.001, 0.5] before every forward (as the official ``AVCLIP``).
"""
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq.models import BaseFairseqModel, register_model
from torch import nn

from avplugins.data.transforms import normalized_segments
from avplugins.models._synchformer_towers import TINY_TOWERS, SynchformerTowersConfig, audio_args, visual_args
from avplugins.models._variants import register_variant
from avplugins.modules.synchformer_net import SynchformerNet, pooled_segment_embeddings


@dataclass
class SynchformerSegmentClipConfig(SynchformerTowersConfig):
    init_temperature: float = field(default=0.07, metadata={"help": "initial InfoNCE temperature"})
    min_temperature: float = field(default=0.001, metadata={"help": "temperature clamp, low end"})
    max_temperature: float = field(default=0.5, metadata={"help": "temperature clamp, high end"})


@register_model("synchformer_segment_clip", dataclass=SynchformerSegmentClipConfig)
class SynchformerSegmentClipModel(BaseFairseqModel):
    def __init__(self, cfg: SynchformerSegmentClipConfig, net: SynchformerNet):
        super().__init__()
        if cfg.video_dim != cfg.audio_dim:
            raise ValueError(
                f"model.video_dim={cfg.video_dim} and model.audio_dim={cfg.audio_dim} must be equal: stage 1 "
                "compares the towers' segment embeddings directly"
            )
        self.cfg = cfg
        self.net = net
        self.temperature = nn.Parameter(torch.tensor(float(cfg.init_temperature)))

    @classmethod
    def build_model(cls, cfg: SynchformerSegmentClipConfig, task=None):
        net = SynchformerNet.build(
            num_segments=cfg.num_segments, visual_args=visual_args(cfg), audio_args=audio_args(cfg),
            with_sync_module=False,
        )
        return cls(cfg, net)

    def forward(
        self, video: torch.Tensor, audio: torch.Tensor, video_frame_index: Optional[torch.Tensor] = None, **unused
    ) -> dict:
        """
        Args:
            video: (B, S, T, 3, H, W) normalised frames, or the datasets' uint8 frames (normalised
                here, see :func:`normalized_segments`); audio: (B, S, 1, F, Ta) log-mels.
            video_frame_index: (S, T) frames of each segment when ``video`` is (B, F, 3, H, W).
        Returns:
            ``video_embeddings``, ``audio_embeddings`` (B, S, D) unit-norm; ``temperature`` ().
        """
        with torch.no_grad():
            self.temperature.clamp_(self.cfg.min_temperature, self.cfg.max_temperature)
        video = normalized_segments(video, video_frame_index, dtype=next(self.net.visual.parameters()).dtype)
        vfeats, afeats = self.net.forward_features(video, audio)
        return {
            "video_embeddings": pooled_segment_embeddings(vfeats),
            "audio_embeddings": pooled_segment_embeddings(afeats),
            "temperature": self.temperature,
        }


register_variant(SynchformerSegmentClipModel, "synchformer_segment_clip", "base", {})
register_variant(SynchformerSegmentClipModel, "synchformer_segment_clip", "tiny", TINY_TOWERS)
