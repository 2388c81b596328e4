"""Motionformer video tower of Synchformer (ViT-B/16, divided space-time attention, 2x16x16
tubelets) with the per-frame spatial aggregation, and what the AST tower shares with it: the
transformer settings (:class:`TowerSettings`) and the CLS-token aggregation layer.

Layout of one segment: T frames -> t = T / tubelet_size temporal slots x (h x w) patches,
token order time-major (token ``1 + i * h * w + j`` is patch j of slot i), CLS first.
A block is: time attention (``time_norm``, no drop-path) -> space attention (``norm1``,
drop-path) -> MLP (``norm2``, drop-path). In both attentions the CLS query attends to every
token, and every patch query attends to the CLS token plus the patches of its own slot
(space) or of its own spatial position (time).
"""
from dataclasses import dataclass
from typing import Any, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from avplugins.modules.attention import (
    DropPath,
    Mlp,
    MultiHeadAttention,
    TransformerBlock,
    init_transformer_weights,
)
from avplugins.modules.patch_embed import embed_patches

SPACE = "space"
TIME = "time"


@dataclass(frozen=True)
class TowerSettings:
    """Transformer settings of a feature tower (ViT-B / AST base by default).

    Attributes:
        dim, depth, num_heads, mlp_ratio, qkv_bias: transformer size.
        dropout: dropout after the embeddings, the attention projections and inside the MLPs
            (official 0).
        attn_dropout: dropout on attention weights (official 0).
        drop_path: stochastic-depth rate (how a tower spreads it over its blocks is its own).
        norm_eps: LayerNorm epsilon of the blocks and the final norm.
    """

    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    dropout: float = 0.0
    attn_dropout: float = 0.0
    drop_path: float = 0.0
    norm_eps: float = 1e-6

    def block_args(self, drop_path: float) -> Tuple[Any, ...]:
        """Positional arguments of one block (:class:`TransformerBlock` or
        :class:`DividedSpaceTimeBlock`) with stochastic-depth rate ``drop_path``."""
        return (
            self.dim, self.num_heads, self.mlp_ratio, self.qkv_bias, self.dropout,
            self.attn_dropout, drop_path, self.norm_eps,
        )


class DividedSpaceTimeAttention(MultiHeadAttention):
    """Self-attention restricted to one axis of a (t, p) token grid, with a global CLS token.

    Same parameters as :class:`MultiHeadAttention` (fused ``qkv``, ``proj``); only the
    attention pattern differs. The projected tokens are regrouped with one copy, each group
    led by its own copy of the CLS row, so that one fused attention call serves all groups
    with heads as strided views; the outputs are written back in place with one more copy.
    """

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, num_slots: int, axis: str
    ) -> torch.Tensor:
        """
        Args:
            x: (B, 1 + t * p, D) tokens: CLS then t temporal slots of p patches each.
            num_slots: t.
            axis: ``"space"`` (patches of the same slot attend to each other) or
                ``"time"`` (patches at the same spatial position attend to each other).
        Returns:
            (B, 1 + t * p, D)
        """
        if axis not in (SPACE, TIME):
            raise ValueError(f"axis must be {SPACE!r} or {TIME!r}, got {axis!r}")
        batch, num_tokens, dim = x.shape
        num_patches = (num_tokens - 1) // num_slots
        if num_slots * num_patches != num_tokens - 1:
            raise ValueError(f"{num_tokens - 1} patch tokens do not split into {num_slots} slots")
        dropout_p = self.attn_dropout if self.training else 0.0
        cls_out, grouped = self.project_and_regroup(x, num_slots, axis, dropout_p)
        num_groups, group_size = grouped.shape[1], grouped.shape[2] - 1
        query, key, value = self.split_heads(grouped.flatten(0, 1))
        patch_out = F.scaled_dot_product_attention(
            query[:, :, 1:], key, value, dropout_p=dropout_p
        )  # (B * G, H, L, Dh)
        patch_out = patch_out.transpose(1, 2).reshape(batch, num_groups, group_size, dim)
        if axis == TIME:
            patch_out = patch_out.transpose(1, 2)
        out = x.new_empty(batch, num_tokens, dim)
        out[:, :1] = cls_out
        out[:, 1:].unflatten(1, (num_slots, num_patches)).copy_(patch_out)
        return self.proj_dropout(self.proj(out))

    def project_and_regroup(
        self, x: torch.Tensor, num_slots: int, axis: str, dropout_p: float
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Project ``x`` (B, 1 + t * p, D), attend with the CLS query over all tokens, and
        regroup the projections along ``axis``.

        Returns:
            ``(cls_out, grouped)``: the CLS attention output before ``proj`` (B, 1, D), and
            the projections (B, G, 1 + L, 3D) of the G groups of L patches, each led by the
            CLS row (every group also sees the CLS key/value; its CLS query is unused).

        Without autograd and attention dropout (inference), the projection skips its bias
        and the regrouping copy adds it, which saves a pass over the (B, N, 3D) projections;
        the CLS query then needs no key bias (it adds the same score to every key) and gets
        the value bias after attending (the weights sum to 1).
        """
        batch, num_tokens, dim = x.shape
        bias = self.qkv.bias
        fold_bias = bias is not None and dropout_p == 0.0 and not torch.is_grad_enabled()
        qkv = F.linear(x, self.qkv.weight, None if fold_bias else bias)  # (B, N, 3D)
        if fold_bias:
            bias = bias.to(qkv.dtype)  # under autocast: add in the projection's dtype
        _, key, value = self.split_heads(qkv)
        cls_query = qkv[:, :1, :dim] + bias[:dim] if fold_bias else qkv[:, :1, :dim]
        (cls_query,) = self.split_heads(cls_query)
        cls_out = F.scaled_dot_product_attention(cls_query, key, value, dropout_p=dropout_p)
        cls_out = cls_out.transpose(1, 2).reshape(batch, 1, dim)

        grid = qkv[:, 1:].unflatten(1, (num_slots, (num_tokens - 1) // num_slots))  # (B, t, p, 3D)
        if axis == TIME:
            grid = grid.transpose(1, 2)
        num_groups, group_size = grid.shape[1:3]
        cls_rows = qkv[:, None, :1].expand(-1, num_groups, -1, -1)
        if not fold_bias:
            return cls_out, torch.cat((cls_rows, grid), dim=2)
        grouped = qkv.new_empty(batch, num_groups, 1 + group_size, 3 * dim)
        torch.add(cls_rows, bias, out=grouped[:, :, :1])
        torch.add(grid, bias, out=grouped[:, :, 1:])
        return cls_out + bias[2 * dim:], grouped


class DividedSpaceTimeBlock(nn.Module):
    """``x + time_attn(time_norm(x))`` -> ``x + drop_path(attn(norm1(x)))`` (space) ->
    ``x + drop_path(mlp(norm2(x)))``.

    Args:
        dim, num_heads, mlp_ratio, qkv_bias: widths of the attentions and the MLP.
        dropout: dropout after the attention projections and inside the MLP.
        attn_dropout: dropout on attention weights.
        drop_path: stochastic depth of the space-attention and MLP branches (the time branch
            has none, as in Motionformer).
        norm_eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.time_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.time_attn = DividedSpaceTimeAttention(dim, num_heads, qkv_bias, attn_dropout, dropout)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = DividedSpaceTimeAttention(dim, num_heads, qkv_bias, attn_dropout, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), "gelu", dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, num_slots: int) -> torch.Tensor:
        """x: (B, 1 + t * p, D) with t = ``num_slots``; returns the same shape."""
        x = x + self.time_attn(self.time_norm(x), num_slots, TIME)
        x = x + self.drop_path(self.attn(self.norm1(x), num_slots, SPACE))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ClsAggregator(nn.Module):
    """One pre-LN transformer layer over a learned CLS token and a set of tokens; returns the
    CLS output. Synchformer pools the 14 x 14 patches of each temporal slot (video) and the
    frequency patches of each time step (audio) with it.

    Args:
        dim, num_heads, mlp_ratio: layer widths (official: the tower's width, heads and 4x MLP).
        dropout: dropout on attention weights, after the projections and inside the MLP.
        norm_eps: LayerNorm epsilon (1e-6 in both towers).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.block = TransformerBlock(
            dim, num_heads, mlp_ratio, qkv_bias=True, dropout=dropout, attn_dropout=dropout,
            norm_eps=norm_eps,
        )

    @classmethod
    def for_tower(cls, settings: TowerSettings, dropout: float, norm_eps: float) -> "ClsAggregator":
        """The aggregation layer of a tower: its width, heads and MLP ratio."""
        return cls(settings.dim, settings.num_heads, settings.mlp_ratio, dropout, norm_eps)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (N, L, D) -> (N, D), the CLS output (only the CLS query is computed)."""
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        return self.block(torch.cat((cls, tokens), dim=1), num_queries=1)[:, 0]


class Motionformer(nn.Module):
    """Motionformer video tower: segments of frames -> one feature per temporal slot.

    Args:
        image_size: side of the square input frames (pixels); sets the patch grid and the
            size of ``pos_embed``.
        patch_size: spatial patch side (pixels).
        num_frames: frames per segment T.
        tubelet_size: frames per tubelet; t = T / tubelet_size temporal slots.
        in_channels: input channels (3, RGB).
        drop_path: stochastic depth of the last block, linearly increasing from 0.
        **transformer: the other :class:`TowerSettings` (dim, depth, num_heads, mlp_ratio,
            qkv_bias, dropout, attn_dropout, norm_eps); ``norm_eps`` also serves the
            aggregation layer, and ``dropout`` all of its dropouts.
    """

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        num_frames: int = 16,
        tubelet_size: int = 2,
        in_channels: int = 3,
        drop_path: float = 0.2,
        **transformer: Any,
    ):
        super().__init__()
        if image_size % patch_size or num_frames % tubelet_size:
            raise ValueError(
                f"image_size {image_size} / num_frames {num_frames} must be multiples of "
                f"patch_size {patch_size} / tubelet_size {tubelet_size}"
            )
        settings = TowerSettings(drop_path=drop_path, **transformer)
        dim = settings.dim
        self.image_size = image_size
        self.num_frames = num_frames
        self.in_channels = in_channels
        self.dim = dim
        self.tokens_per_segment = num_frames // tubelet_size
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv3d(
            in_channels, dim, kernel_size=(tubelet_size, patch_size, patch_size),
            stride=(tubelet_size, patch_size, patch_size),
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, dim))  # CLS + one frame
        self.temp_embed = nn.Parameter(torch.zeros(1, self.tokens_per_segment, dim))
        self.pos_dropout = nn.Dropout(settings.dropout)
        depth = settings.depth
        self.blocks = nn.ModuleList(
            DividedSpaceTimeBlock(*settings.block_args(drop_path * i / max(depth - 1, 1)))
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=settings.norm_eps)
        self.spatial_agg = ClsAggregator.for_tower(settings, settings.dropout, settings.norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        tokens = (self.cls_token, self.pos_embed, self.temp_embed, self.spatial_agg.cls_token)
        init_transformer_weights(self, tokens)

    def position_embedding(self, num_slots: int, num_patches: int) -> torch.Tensor:
        """(1, 1 + t * p, D): the spatial embedding tiled over the t slots plus the temporal
        embedding of each slot; the CLS token gets the spatial one only."""
        spatial = self.pos_embed[:, 1:].repeat(1, num_slots, 1)
        temporal = self.temp_embed.repeat_interleave(num_patches, dim=1)
        return torch.cat((self.pos_embed[:, :1], spatial + temporal), dim=1)

    def forward_tokens(self, clips: torch.Tensor) -> Tuple[torch.Tensor, int]:
        """
        Args:
            clips: (N, C, T, H, W) segments.
        Returns:
            ``(tokens, t)``: final-normed patch tokens (N, t, h * w, D) without the CLS token,
            and the number of temporal slots t.
        """
        x = embed_patches(clips, self.patch_embed)  # (N, D, t, h, w)
        num_slots, num_patches = x.shape[2], x.shape[3] * x.shape[4]
        x = x.flatten(2).transpose(1, 2)  # (N, t * h * w, D), time-major
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.pos_dropout(x + self.position_embedding(num_slots, num_patches))
        for block in self.blocks:
            x = block(x, num_slots)
        x = self.norm(x[:, 1:])
        return x.reshape(x.shape[0], num_slots, num_patches, self.dim), num_slots

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """
        Args:
            video: (B, S, T, C, H, W) normalised frames, S segments of T frames.
        Returns:
            (B, S, t, D) features, one per temporal slot (t = T / tubelet_size).
        """
        expected = (self.num_frames, self.in_channels, self.image_size, self.image_size)
        if video.ndim != 6 or tuple(video.shape[2:]) != expected:
            raise ValueError(
                f"Motionformer expects video (B, S, T, C, H, W) with (T, C, H, W) = {expected}, "
                f"got {tuple(video.shape)}"
            )
        batch, segments = video.shape[:2]
        clips = video.flatten(0, 1).transpose(1, 2)  # (B*S, C, T, H, W)
        tokens, num_slots = self.forward_tokens(clips)
        pooled = self.spatial_agg(tokens.flatten(0, 1))  # (B*S*t, D)
        return pooled.reshape(batch, segments, num_slots, self.dim)
