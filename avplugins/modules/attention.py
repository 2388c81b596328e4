"""The one attention implementation of the project and the pre-LN transformer block built on it.

Every transformer here (AST, Motionformer, the aggregation layers, the Synchformer sync module,
the AV-data2vec encoder) uses :class:`MultiHeadAttention`, which calls
``torch.nn.functional.scaled_dot_product_attention`` so that the fused kernels (flash,
memory-efficient, CPU flash) are used wherever PyTorch has them. Checkpoints of other
projects with separate query/key/value projections are remapped onto the fused ``qkv``
projection by the importers in ``avplugins.convert``.
"""
from typing import Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample with probability ``drop_prob``
    during training and rescales the kept ones by ``1 / (1 - drop_prob)``."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        keep = x.new_empty(mask_shape).bernoulli_(keep_prob)
        return x * keep / keep_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    """``fc1 -> activation -> activation_dropout -> fc2 -> dropout``.

    ``activation_dropout`` defaults to ``dropout``; wav2vec2-style encoders set it apart
    (their ``activation_dropout`` is 0 while ``dropout`` is 0.1).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        activation: str = "gelu",
        dropout: float = 0.0,
        activation_dropout: Optional[float] = None,
    ):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = {"gelu": nn.GELU(), "relu": nn.ReLU()}[activation]
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.activation_dropout = nn.Dropout(
            dropout if activation_dropout is None else activation_dropout
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.activation_dropout(self.act(self.fc1(x)))))


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection.

    Args:
        dim: model width D (divisible by ``num_heads``).
        num_heads: number of heads H.
        qkv_bias: whether the ``qkv`` projection has a bias.
        attn_dropout: dropout on the attention weights (training only).
        proj_dropout: dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_dropout: float = 0.0,
        proj_dropout: float = 0.0,
    ):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_dropout = attn_dropout
        self.proj_dropout = nn.Dropout(proj_dropout)

    def split_heads(self, qkv: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """(B, N, k * D) output of ``qkv`` (or of a part of it holding k of query / key / value)
        -> k tensors, each a (B, H, N, Dh) view (no copy)."""
        heads = qkv.unflatten(-1, (-1, self.num_heads, self.head_dim))  # (B, N, k, H, Dh)
        return heads.permute(2, 0, 3, 1, 4).unbind(0)

    def project_first_queries(
        self, x: torch.Tensor, num_queries: int
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``split_heads(qkv(x))`` with the query projected for the first ``num_queries`` tokens
        only: query (B, H, num_queries, Dh), key and value (B, H, N, Dh)."""
        dim = self.num_heads * self.head_dim
        weight, bias = self.qkv.weight, self.qkv.bias
        query_bias, key_value_bias = (None, None) if bias is None else (bias[:dim], bias[dim:])
        (query,) = self.split_heads(F.linear(x[:, :num_queries], weight[:dim], query_bias))
        key, value = self.split_heads(F.linear(x, weight[dim:], key_value_bias))
        return query, key, value

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        attn_mask: Optional[torch.Tensor] = None,
        num_queries: Optional[int] = None,
    ) -> torch.Tensor:
        """
        Args:
            x: (B, N, D) tokens.
            key_padding_mask: optional (B, N) bool, True where a key is padding (ignored).
            attn_mask: optional bool (Q, N) / (B, H, Q, N), True where attention is allowed,
                or a float mask added to the scores (Q = N, or ``num_queries``).
            num_queries: only the first Q tokens query (all N are keys and values), so a
                caller that reads only them (a CLS readout) skips the other queries' work.
        Returns:
            (B, Q, D), Q = N unless ``num_queries`` is given.
        """
        batch, _, dim = x.shape
        if num_queries is None:
            query, key, value = self.split_heads(self.qkv(x))
        else:
            query, key, value = self.project_first_queries(x, num_queries)
        mask = attn_mask
        if key_padding_mask is not None:
            keep = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, N)
            if mask is None:
                mask = keep
            elif mask.dtype == torch.bool:
                mask = mask & keep
            else:
                mask = mask.masked_fill(~keep, float("-inf"))
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=self.attn_dropout if self.training else 0.0
        )
        out = out.transpose(1, 2).reshape(batch, query.shape[2], dim)
        return self.proj_dropout(self.proj(out))


class TransformerBlock(nn.Module):
    """Pre-LN transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``.

    Args:
        dim, num_heads: width and heads of the attention.
        mlp_ratio: hidden width of the MLP as a multiple of ``dim``.
        qkv_bias: bias on the fused qkv projection.
        dropout: dropout inside the MLP and after the attention projection.
        attn_dropout: dropout on attention weights.
        drop_path: stochastic-depth rate of both residual branches.
        norm_eps: LayerNorm epsilon (1e-6 ViT/Motionformer, 1e-12 AST, 1e-5 PyTorch default).
        activation: ``gelu`` or ``relu``.
        activation_dropout: dropout after the MLP activation (default: ``dropout``).
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
        activation: str = "gelu",
        activation_dropout: Optional[float] = None,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = MultiHeadAttention(dim, num_heads, qkv_bias, attn_dropout, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), activation, dropout, activation_dropout)
        self.drop_path = DropPath(drop_path)

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        return_ffn_output: bool = False,
        num_queries: Optional[int] = None,
    ):
        """
        Args:
            x: (B, N, D).
            key_padding_mask: optional (B, N) bool, True at padding.
            return_ffn_output: also return the MLP branch output before the residual add
                (B, Q, D): data2vec builds its targets from it.
            num_queries: compute the outputs of the first Q tokens only (they still attend
                to all N); equal to ``block(x)[:, :Q]`` at a fraction of the cost.
        Returns:
            (B, Q, D) with Q = N unless ``num_queries`` is given, or ``(x, ffn_output)``
            when ``return_ffn_output``.
        """
        attended = self.attn(self.norm1(x), key_padding_mask=key_padding_mask, num_queries=num_queries)
        x = x[:, : attended.shape[1]] + self.drop_path(attended)
        ffn_output = self.mlp(self.norm2(x))
        x = x + self.drop_path(ffn_output)
        if return_ffn_output:
            return x, ffn_output
        return x


def init_transformer_weights(
    module: nn.Module, tokens: Iterable[nn.Parameter] = (), std: float = 0.02
) -> None:
    """ViT-style init, in place: linear and convolution weights and the learned ``tokens``
    (CLS tokens, position embeddings) from a normal with ``std`` truncated at 2 std, zero
    biases; LayerNorm weight 1, bias 0."""
    truncated_normal = dict(std=std, a=-2 * std, b=2 * std)
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Conv2d, nn.Conv3d)):
            nn.init.trunc_normal_(sub.weight, **truncated_normal)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)
    for token in tokens:
        nn.init.trunc_normal_(token, **truncated_normal)
