"""Synchformer as one plain module: the Motionformer and AST towers, the projections into the
sync module's width and the sync module; plus stage 1's per-segment pooled embeddings."""
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from avplugins.modules.ast import AudioSpectrogramTransformer
from avplugins.modules.attention import init_transformer_weights
from avplugins.modules.motionformer import Motionformer
from avplugins.modules.sync_transformer import SyncTransformer


def pooled_segment_embeddings(features: torch.Tensor) -> torch.Tensor:
    """Stage 1's segment embedding: the mean of a segment's tokens, L2-normalised.

    Args:
        features: (B, S, T, D) per-segment token features of one tower.
    Returns:
        (B, S, D) unit-norm segment embeddings.
    """
    return F.normalize(features.mean(dim=2), dim=-1)


@torch.no_grad()
def init_feature_copy(projection: nn.Linear) -> None:
    """Set ``projection`` (``in_features`` -> ``out_features >= in_features``) to copy its input,
    minus the mean over the input channels, into the first ``in_features`` output channels and
    leave the others zero (in place). Centred, the copy has zero mean over all output channels,
    so a LayerNorm after it leaves the other channels at zero."""
    projection.weight.zero_()
    size = projection.in_features
    projection.weight[:size].copy_(torch.eye(size) - 1.0 / size)
    projection.bias.zero_()


class SynchformerNet(nn.Module):
    """Both feature towers, optionally followed by ``vproj`` / ``aproj`` and the sync module.

    Args:
        visual: the video tower.
        audio: the audio tower.
        sync: the sync module; ``None`` keeps the towers only (stage 1), without projections.
    """

    def __init__(
        self,
        visual: Motionformer,
        audio: AudioSpectrogramTransformer,
        sync: Optional[SyncTransformer] = None,
    ):
        super().__init__()
        if sync is not None:
            visual_segments = sync.num_visual_tokens / visual.tokens_per_segment
            audio_segments = sync.num_audio_tokens / audio.tokens_per_segment
            if visual_segments != audio_segments or not visual_segments.is_integer():
                raise ValueError(
                    f"sync module built for {sync.num_visual_tokens} visual and "
                    f"{sync.num_audio_tokens} audio tokens, but the towers give "
                    f"{visual.tokens_per_segment} and {audio.tokens_per_segment} per segment"
                )
        self.visual = visual
        self.audio = audio
        self.sync = sync
        if sync is not None:
            self.vproj = nn.Linear(visual.dim, sync.dim)
            self.aproj = nn.Linear(audio.dim, sync.dim)
            for projection in (self.vproj, self.aproj):
                init_transformer_weights(projection)

    @torch.no_grad()
    def init_aligned(self, class_shifts: Sequence[int]) -> None:
        """The aligned initialisation of the sync module (``SyncTransformer.init_aligned``), with
        the projections starting as centred copies of the tower features into the content
        channels; ``class_shifts[c]``: segments from an audio segment to its visual partner
        under offset class c."""
        if self.sync is None:
            raise RuntimeError("this SynchformerNet was built without a sync module (stage 1)")
        if self.visual.dim != self.audio.dim:
            raise ValueError(
                f"the aligned sync init compares visual and audio features directly and needs one width "
                f"for both towers, got {self.visual.dim} and {self.audio.dim}: use model.sync_init=official"
            )
        content_dim = self.visual.dim
        num_segments = self.sync.num_visual_tokens // self.visual.tokens_per_segment
        self.sync.aligned_channels(content_dim, num_segments)  # refuse a too narrow module before changing anything
        for projection in (self.vproj, self.aproj):
            init_feature_copy(projection)
        self.sync.init_aligned(content_dim, class_shifts, self.visual.tokens_per_segment, self.audio.tokens_per_segment)

    @classmethod
    def build(
        cls,
        num_segments: int = 14,
        visual_args: Optional[Mapping[str, Any]] = None,
        audio_args: Optional[Mapping[str, Any]] = None,
        sync_args: Optional[Mapping[str, Any]] = None,
        with_sync_module: bool = True,
    ) -> "SynchformerNet":
        """Builds the towers and the sync module from their constructor arguments (defaults:
        the paper's base sizes), sizing the sync module's sequence for ``num_segments``.
        ``with_sync_module=False`` builds the towers only (stage 1)."""
        visual = Motionformer(**(visual_args or {}))
        audio = AudioSpectrogramTransformer(**(audio_args or {}))
        sync = None
        if with_sync_module:
            sync = SyncTransformer(
                num_visual_tokens=num_segments * visual.tokens_per_segment,
                num_audio_tokens=num_segments * audio.tokens_per_segment,
                **(sync_args or {}),
            )
        return cls(visual, audio, sync)

    def forward_features(
        self, video: torch.Tensor, audio: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            video: (B, S, T, C, H, W) normalised frames.
            audio: (B, S, 1, F, Ta) normalised log-mels.
        Returns:
            ``vfeats (B, S, tv, Dv)``, ``afeats (B, S, ta, Da)``.
        """
        return self.visual(video), self.audio(audio)

    def sync_tokens(self, vfeats: torch.Tensor, afeats: torch.Tensor) -> torch.Tensor:
        """(B, S, tv, Dv), (B, S, ta, Da) -> (B, 2 + S * (tv + ta), D): the sync module's
        final-normed tokens (segments flattened in order, OFF token first)."""
        if self.sync is None:
            raise RuntimeError("this SynchformerNet was built without a sync module (stage 1)")
        visual = self.vproj(vfeats).flatten(1, 2)
        audio = self.aproj(afeats).flatten(1, 2)
        return self.sync.encode(visual, audio)

    def forward_head(self, vfeats: torch.Tensor, afeats: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Tower features -> ``offset_logits (B, n_offsets)`` and/or ``sync_logits (B, 2)``."""
        tokens = self.sync_tokens(vfeats, afeats)
        return self.sync.heads(tokens)

    def forward(self, video: torch.Tensor, audio: torch.Tensor) -> Dict[str, torch.Tensor]:
        """(B, S, T, C, H, W) frames, (B, S, 1, F, Ta) log-mels -> dict of logits."""
        return self.forward_head(*self.forward_features(video, audio))
