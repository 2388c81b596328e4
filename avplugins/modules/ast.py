"""AST audio tower of Synchformer (Audio Spectrogram Transformer, DeiT layout with CLS and
distillation tokens) with the per-time-step frequency aggregation.

A (F mel bins x Ta frames) log-mel segment is cut into 16 x 16 patches with stride 10 on both
axes: f = (F - 16) // 10 + 1 frequency rows x t = (Ta - 16) // 10 + 1 time columns (12 x 6
for 128 x 66). Tokens are frequency-major (token ``2 + i * t + j`` is row i, column j),
after CLS and distillation tokens; the position embedding has exactly 2 + f * t entries, so
its size follows from ``num_mel_bins`` and ``time_frames``.
"""
from typing import Any, Tuple

import torch
from torch import nn

from avplugins.modules.attention import TransformerBlock, init_transformer_weights
from avplugins.modules.patch_embed import embed_patches
from avplugins.modules.motionformer import ClsAggregator, TowerSettings


def patch_grid(size: int, patch_size: int, stride: int) -> int:
    """Number of patches of ``patch_size`` at ``stride`` along an axis of ``size`` bins."""
    if size < patch_size:
        raise ValueError(f"an axis of {size} bins is shorter than one patch ({patch_size})")
    return (size - patch_size) // stride + 1


class AudioSpectrogramTransformer(nn.Module):
    """AST audio tower: log-mel segments -> one feature per time column of patches.

    Args:
        num_mel_bins: F, mel bins per segment.
        time_frames: Ta, spectrogram frames per segment (66 = 0.64 s at 100 Hz, padded).
        patch_size: square patch side (bins).
        freq_stride, time_stride: patch strides (bins / frames).
        norm_eps: LayerNorm epsilon of the blocks and the final norm (1e-12, as AST).
        agg_norm_eps: LayerNorm epsilon of the frequency aggregation layer (1e-6).
        **transformer: the other :class:`TowerSettings` (dim, depth, num_heads, mlp_ratio,
            qkv_bias, dropout, attn_dropout, drop_path); ``drop_path`` is the rate of every
            block, ``attn_dropout`` all dropouts of the aggregation layer.
    """

    def __init__(
        self,
        num_mel_bins: int = 128,
        time_frames: int = 66,
        patch_size: int = 16,
        freq_stride: int = 10,
        time_stride: int = 10,
        norm_eps: float = 1e-12,
        agg_norm_eps: float = 1e-6,
        **transformer: Any,
    ):
        super().__init__()
        settings = TowerSettings(norm_eps=norm_eps, **transformer)
        dim = settings.dim
        self.num_mel_bins = num_mel_bins
        self.time_frames = time_frames
        self.dim = dim
        self.freq_patches = patch_grid(num_mel_bins, patch_size, freq_stride)
        self.tokens_per_segment = patch_grid(time_frames, patch_size, time_stride)
        self.patch_embed = nn.Conv2d(
            1, dim, kernel_size=patch_size, stride=(freq_stride, time_stride)
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim))
        num_patches = self.freq_patches * self.tokens_per_segment
        self.pos_embed = nn.Parameter(torch.zeros(1, 2 + num_patches, dim))
        self.pos_dropout = nn.Dropout(settings.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                *settings.block_args(settings.drop_path),
                activation_dropout=0.0,  # AST has no dropout after the MLP activation
            )
            for _ in range(settings.depth)
        )
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.freq_agg = ClsAggregator.for_tower(settings, settings.attn_dropout, agg_norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        tokens = (self.cls_token, self.dist_token, self.pos_embed, self.freq_agg.cls_token)
        init_transformer_weights(self, tokens)

    @property
    def grid(self) -> Tuple[int, int]:
        """(f, t): patch rows along frequency and columns along time."""
        return self.freq_patches, self.tokens_per_segment

    def forward_tokens(self, spectrograms: torch.Tensor) -> torch.Tensor:
        """
        Args:
            spectrograms: (N, 1, F, Ta) normalised log-mels.
        Returns:
            (N, f, t, D) final-normed patch tokens, without the CLS and distillation tokens.
        """
        x = embed_patches(spectrograms, self.patch_embed).flatten(2).transpose(1, 2)  # (N, f * t, D)
        extra = torch.cat((self.cls_token, self.dist_token), dim=1).expand(x.shape[0], -1, -1)
        x = self.pos_dropout(torch.cat((extra, x), dim=1) + self.pos_embed)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)[:, 2:]
        return x.reshape(x.shape[0], *self.grid, self.dim)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """
        Args:
            audio: (B, S, 1, F, Ta) normalised log-mel segments.
        Returns:
            (B, S, t, D) features, one per time column of patches.
        """
        expected = (1, self.num_mel_bins, self.time_frames)
        if audio.ndim != 5 or tuple(audio.shape[2:]) != expected:
            raise ValueError(
                f"AST expects audio (B, S, 1, F, Ta) with (1, F, Ta) = {expected}, "
                f"got {tuple(audio.shape)}"
            )
        batch, segments = audio.shape[:2]
        tokens = self.forward_tokens(audio.flatten(0, 1))  # (B*S, f, t, D)
        per_time_step = tokens.transpose(1, 2).flatten(0, 1)  # (B*S*t, f, D)
        pooled = self.freq_agg(per_time_step)
        return pooled.reshape(batch, segments, self.tokens_per_segment, self.dim)
