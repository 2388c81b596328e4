"""Synchformer's synchronisation module: a small pre-LN transformer over the projected visual
and audio segment features of a whole clip, read out at a learned OFF token.

Token layout: ``[OFF, visual (S * tv), MOD, audio (S * ta)]`` (1 + 112 + 1 + 84 = 198 for
14 segments), each stream layer-normed on its own, plus one learned position embedding per
token. Heads read token 0 (OFF): ``offset_head`` (21 offset classes) and, in the
synchronizability variant, ``sync_head`` (2 classes).

Two initialisations: the official one (:meth:`SyncTransformer.reset_parameters`) and an
*aligned* one (:meth:`SyncTransformer.init_aligned`) that starts the module as a working
offset detector instead of on the long plateau at loss ln(21) (see its docstring).
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

    def aligned_channels(self, content_dim: int) -> Dict[str, int]:
        """The residual channels :meth:`init_aligned` uses for a ``content_dim``-wide content
        (channels ``0 .. content_dim-1``): modality sign, visual time, audio time, and the slot
        that receives the attended visual time.

        Raises:
            ValueError: the width leaves no room for them, or head 0 cannot see the content.
        """
        head_dim = self.dim // self.blocks[0].attn.num_heads
        if self.dim < content_dim + 4 or head_dim < 2:
            raise ValueError(
                f"the aligned sync init needs sync_dim >= feature dim + 4 ({content_dim + 4}) and a head "
                f"width >= 2, got sync_dim {self.dim} with {self.blocks[0].attn.num_heads} heads: "
                "raise model.sync_dim or use model.sync_init=official"
            )
        return dict(modality=content_dim, visual_time=content_dim + 1, audio_time=content_dim + 2,
                    attended_time=content_dim + 3)

    @torch.no_grad()
    def init_aligned(
        self,
        content_dim: int,
        content_gain: float = 3.0,
        modality_gain: float = 12.0,
        modality_code: float = 3.0,
        time_range: float = 2.0,
    ) -> None:
        """Start the module as an offset detector (in place), so stage 2 learns from the first
        updates instead of sitting on the plateau at loss ln(21) that the official
        initialisation gives (official issues #5, #19; days of GPU training in the paper).

        The offset is a second-order quantity (which visual token matches an audio token, and
        where it lies relative to it), and at a small random init every path that carries it is
        a product of near-zero matrices, hence the plateau. Here the path exists from the start:

        - position embedding: a modality sign (+ visual, - audio) and a linear time ramp over
          each stream's tokens, in channels of their own (:meth:`aligned_channels`);
        - block 0, head 0: query and key compare the content channels (the projected tower
          features, which stage 1 made similar for matching audio and video) and the modality
          sign with opposite signs, so audio tokens attend to the visual tokens whose features
          match theirs, not to their own stream; its value is the visual time, written to the
          ``attended_time`` channel, so ``attended_time - audio_time`` of an audio token is its
          offset estimate;
        - later blocks: identity value and output paths, so the OFF token (near-uniform
          attention) reads the mean estimate and the head can learn from it at once.
        Every other weight keeps the official init; all of them are trained.

        Args:
            content_dim: channels ``0 .. content_dim-1`` hold the content (the projections
                are expected to copy the features there, see ``SynchformerNet.init_aligned``).
            content_gain, modality_gain: scales of the content and modality terms of head 0's
                query/key (the modality term must beat a token's match with itself).
            modality_code, time_range: values of the modality sign and of the ramp's ends.
        """
        channels = self.aligned_channels(content_dim)
        first = self.blocks[0].attn
        head_dim = self.dim // first.num_heads
        query, key, value = first.qkv.weight.split(self.dim)
        self.pos_embed.zero_()
        visual = slice(1, 1 + self.num_visual_tokens)
        audio = slice(2 + self.num_visual_tokens, None)
        self.pos_embed[0, visual, channels["modality"]] = modality_code
        self.pos_embed[0, audio, channels["modality"]] = -modality_code
        self.pos_embed[0, visual, channels["visual_time"]] = torch.linspace(-time_range, time_range, self.num_visual_tokens)
        self.pos_embed[0, audio, channels["audio_time"]] = torch.linspace(-time_range, time_range, self.num_audio_tokens)
        compared = min(content_dim, head_dim - 1)
        for projection in (query, key, value):
            projection[:head_dim].zero_()
        query[:compared, :compared] = content_gain * torch.eye(compared)
        key[:compared, :compared] = content_gain * torch.eye(compared)
        query[head_dim - 1, channels["modality"]] = modality_gain
        key[head_dim - 1, channels["modality"]] = -modality_gain
        value[0, channels["visual_time"]] = 1.0
        first.proj.weight[:, :head_dim].zero_()
        first.proj.weight[channels["attended_time"], 0] = 1.0
        for block in self.blocks[1:]:
            block.attn.qkv.weight[2 * self.dim:].copy_(torch.eye(self.dim))
            block.attn.proj.weight.copy_(torch.eye(self.dim))

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

