"""Synchformer's synchronisation module: a small pre-LN transformer over the projected visual
and audio segment features of a whole clip, read out at a learned OFF token.

Token layout: ``[OFF, visual (S * tv), MOD, audio (S * ta)]`` (1 + 112 + 1 + 84 = 198 for
14 segments), each stream layer-normed on its own, plus one learned position embedding per
token. Heads read token 0 (OFF): ``offset_head`` (21 offset classes) and, in the
synchronizability variant, ``sync_head`` (2 classes).
"""
from typing import Dict

import torch
from torch import nn

from avplugins.modules.attention import TransformerBlock, init_transformer_weights


class SyncTransformer(nn.Module):
    """
    Args:
        num_visual_tokens: visual tokens per clip (segments x tokens per segment).
        num_audio_tokens: audio tokens per clip.
        dim, depth, num_heads, mlp_ratio: transformer size.
        num_offset_classes: size of ``offset_head``; 0 for none (the official
            synchronizability model has only ``sync_head``).
        sync_head: add the binary synchronizability head.
        dropout: after the position embedding, after the attention projection and after the
            MLP (none after the MLP activation, as the official module).
        attn_dropout: dropout on attention weights.
        norm_eps: LayerNorm epsilon (PyTorch default 1e-5, as the official module).
    """

    def __init__(
        self,
        num_visual_tokens: int = 112,
        num_audio_tokens: int = 84,
        dim: int = 768,
        depth: int = 3,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        num_offset_classes: int = 21,
        sync_head: bool = False,
        dropout: float = 0.1,
        attn_dropout: float = 0.1,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        if num_offset_classes <= 0 and not sync_head:
            raise ValueError("SyncTransformer needs an offset head, a sync head or both")
        self.num_visual_tokens = num_visual_tokens
        self.num_audio_tokens = num_audio_tokens
        self.dim = dim
        self.off_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mod_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.visual_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.audio_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.pos_embed = nn.Parameter(torch.zeros(1, 2 + num_visual_tokens + num_audio_tokens, dim))
        self.embed_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                dim, num_heads, mlp_ratio, qkv_bias=True, dropout=dropout,
                attn_dropout=attn_dropout, norm_eps=norm_eps, activation_dropout=0.0,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.offset_head = nn.Linear(dim, num_offset_classes) if num_offset_classes > 0 else None
        self.sync_head = nn.Linear(dim, 2) if sync_head else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_transformer_weights(self)
        # the official module draws its OFF / MOD tokens and position embedding from N(0, 1)
        for token in (self.off_token, self.mod_token, self.pos_embed):
            nn.init.normal_(token)

    def encode(self, visual: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """
        Args:
            visual: (B, Nv, D) projected visual tokens, segment-major.
            audio: (B, Na, D) projected audio tokens, segment-major.
        Returns:
            (B, 2 + Nv + Na, D) final-normed tokens, OFF first.
        """
        expected = (self.num_visual_tokens, self.num_audio_tokens)
        if (visual.shape[1], audio.shape[1]) != expected:
            raise ValueError(
                f"the sync module was built for (visual, audio) = {expected} tokens, got "
                f"{(visual.shape[1], audio.shape[1])}: check the number of segments"
            )
        batch = visual.shape[0]
        x = torch.cat(
            (
                self.off_token.expand(batch, -1, -1),
                self.visual_norm(visual),
                self.mod_token.expand(batch, -1, -1),
                self.audio_norm(audio),
            ),
            dim=1,
        )
        x = self.embed_dropout(x + self.pos_embed)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def heads(self, tokens: torch.Tensor) -> Dict[str, torch.Tensor]:
        """tokens: (B, N, D) from :meth:`encode` -> ``offset_logits (B, n_offsets)`` and/or
        ``sync_logits (B, 2)``, both read from the OFF token."""
        off = tokens[:, 0]
        out: Dict[str, torch.Tensor] = {}
        if self.offset_head is not None:
            out["offset_logits"] = self.offset_head(off)
        if self.sync_head is not None:
            out["sync_logits"] = self.sync_head(off)
        return out

    def forward(self, visual: torch.Tensor, audio: torch.Tensor) -> Dict[str, torch.Tensor]:
        """(B, Nv, D), (B, Na, D) -> dict of logits (see :meth:`heads`)."""
        return self.heads(self.encode(visual, audio))

