"""A straightforward eager Synchformer, the baseline of ``synchformer_inference.py``.

It runs the weights of a :class:`avplugins.modules.synchformer_net.SynchformerNet` (its
``state_dict``) with plain tensor operations: attention written out as
``softmax(Q K^T / sqrt(Dh)) V``, the divided attention by regrouping tokens and concatenating
the CLS key/value to every group (as the official Motionformer does), and the towers run one
segment at a time. It shares no code with ``avplugins.modules`` and serves as the oracle that
the optimised modules must equal (``tests/test_benchmarks_equal.py``).
"""
from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn.functional as F

Weights = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class EagerConfig:
    """Heads and LayerNorm epsilons of the three transformers (the widths come from the weights)."""

    visual_heads: int = 12
    audio_heads: int = 12
    sync_heads: int = 8
    visual_eps: float = 1e-6
    audio_eps: float = 1e-12
    aggregation_eps: float = 1e-6
    sync_eps: float = 1e-5
    audio_stride: int = 10
    tubelet_size: int = 2


def linear(w: Weights, name: str, x: torch.Tensor) -> torch.Tensor:
    return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]


def layer_norm(w: Weights, name: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"], eps)


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(..., Lq, Dh), (..., Lk, Dh), (..., Lk, Dh) -> (..., Lq, Dh), unfused."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return scores.softmax(dim=-1) @ v


def split_heads(qkv: torch.Tensor, heads: int):
    """(B, N, 3D) -> q, k, v each (B, H, N, Dh)."""
    batch, tokens, width = qkv.shape
    return qkv.reshape(batch, tokens, 3, heads, width // (3 * heads)).permute(2, 0, 3, 1, 4)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, Dh) -> (B, N, H * Dh)."""
    return x.transpose(1, 2).flatten(2)


def self_attention(w: Weights, name: str, x: torch.Tensor, heads: int) -> torch.Tensor:
    q, k, v = split_heads(linear(w, f"{name}.qkv", x), heads)
    return linear(w, f"{name}.proj", merge_heads(softmax_attention(q, k, v)))


def divided_attention(
    w: Weights, name: str, x: torch.Tensor, heads: int, slots: int, axis: str
) -> torch.Tensor:
    """x (B, 1 + t * p, D): CLS attends to all; patches to CLS + their slot ("space") or
    their spatial position ("time")."""
    batch, tokens, _ = x.shape
    patches = (tokens - 1) // slots
    q, k, v = split_heads(linear(w, f"{name}.qkv", x), heads)  # (B, H, N, Dh)
    cls_out = softmax_attention(q[:, :, :1], k, v)

    def grouped(t: torch.Tensor) -> torch.Tensor:  # (B, H, t * p, Dh) -> (B, H, G, L, Dh)
        grid = t.reshape(batch, heads, slots, patches, -1)
        return grid if axis == "space" else grid.transpose(2, 3)

    q_groups = grouped(q[:, :, 1:])
    groups = q_groups.shape[2]
    k_groups = torch.cat((k[:, :, None, :1].repeat(1, 1, groups, 1, 1), grouped(k[:, :, 1:])), dim=3)
    v_groups = torch.cat((v[:, :, None, :1].repeat(1, 1, groups, 1, 1), grouped(v[:, :, 1:])), dim=3)
    out = softmax_attention(q_groups, k_groups, v_groups)
    if axis == "time":
        out = out.transpose(2, 3)
    out = torch.cat((cls_out, out.reshape(batch, heads, slots * patches, -1)), dim=2)
    return linear(w, f"{name}.proj", merge_heads(out))


def mlp(w: Weights, name: str, x: torch.Tensor) -> torch.Tensor:
    return linear(w, f"{name}.fc2", F.gelu(linear(w, f"{name}.fc1", x)))


def pre_ln_block(w: Weights, name: str, x: torch.Tensor, heads: int, eps: float) -> torch.Tensor:
    x = x + self_attention(w, f"{name}.attn", layer_norm(w, f"{name}.norm1", x, eps), heads)
    return x + mlp(w, f"{name}.mlp", layer_norm(w, f"{name}.norm2", x, eps))


def cls_aggregate(w: Weights, name: str, tokens: torch.Tensor, heads: int, eps: float) -> torch.Tensor:
    """(N, L, D) -> (N, D): one pre-LN layer over [CLS, tokens], the CLS output."""
    cls = w[f"{name}.cls_token"].expand(tokens.shape[0], -1, -1)
    return pre_ln_block(w, f"{name}.block", torch.cat((cls, tokens), dim=1), heads, eps)[:, 0]


def num_blocks(w: Weights, prefix: str) -> int:
    return len({key.split(".")[2] for key in w if key.startswith(f"{prefix}.blocks.")})


def motionformer_segment(w: Weights, frames: torch.Tensor, cfg: EagerConfig) -> torch.Tensor:
    """frames (B, T, C, H, W) of one segment -> (B, t, D)."""
    x = F.conv3d(frames.transpose(1, 2), w["visual.patch_embed.weight"], w["visual.patch_embed.bias"],
                 stride=w["visual.patch_embed.weight"].shape[2:])
    batch, dim, slots, rows, cols = x.shape
    patches = rows * cols
    x = x.flatten(2).transpose(1, 2)
    pos = w["visual.pos_embed"]
    spatial = pos[:, 1:].repeat(1, slots, 1) + w["visual.temp_embed"].repeat_interleave(patches, dim=1)
    x = torch.cat((w["visual.cls_token"].expand(batch, -1, -1), x), dim=1)
    x = x + torch.cat((pos[:, :1], spatial), dim=1)
    heads, eps = cfg.visual_heads, cfg.visual_eps
    for i in range(num_blocks(w, "visual")):
        name = f"visual.blocks.{i}"
        x = x + divided_attention(w, f"{name}.time_attn", layer_norm(w, f"{name}.time_norm", x, eps),
                                  heads, slots, "time")
        x = x + divided_attention(w, f"{name}.attn", layer_norm(w, f"{name}.norm1", x, eps), heads, slots, "space")
        x = x + mlp(w, f"{name}.mlp", layer_norm(w, f"{name}.norm2", x, eps))
    x = layer_norm(w, "visual.norm", x[:, 1:], eps).reshape(batch * slots, patches, dim)
    return cls_aggregate(w, "visual.spatial_agg", x, heads, cfg.aggregation_eps).reshape(batch, slots, dim)


def ast_segment(w: Weights, spectrogram: torch.Tensor, cfg: EagerConfig) -> torch.Tensor:
    """spectrogram (B, 1, F, Ta) of one segment -> (B, ta, D)."""
    x = F.conv2d(spectrogram, w["audio.patch_embed.weight"], w["audio.patch_embed.bias"], stride=cfg.audio_stride)
    batch, dim, rows, cols = x.shape
    extra = torch.cat((w["audio.cls_token"], w["audio.dist_token"]), dim=1).expand(batch, -1, -1)
    x = torch.cat((extra, x.flatten(2).transpose(1, 2)), dim=1) + w["audio.pos_embed"]
    for i in range(num_blocks(w, "audio")):
        x = pre_ln_block(w, f"audio.blocks.{i}", x, cfg.audio_heads, cfg.audio_eps)
    x = layer_norm(w, "audio.norm", x, cfg.audio_eps)[:, 2:].reshape(batch, rows, cols, dim)
    per_time_step = x.transpose(1, 2).reshape(batch * cols, rows, dim)
    return cls_aggregate(w, "audio.freq_agg", per_time_step, cfg.audio_heads, cfg.aggregation_eps).reshape(
        batch, cols, dim)


def sync_logits(w: Weights, vfeats: torch.Tensor, afeats: torch.Tensor, cfg: EagerConfig) -> torch.Tensor:
    """(B, S, tv, Dv), (B, S, ta, Da) -> offset logits (B, n_offsets)."""
    batch = vfeats.shape[0]
    eps = cfg.sync_eps
    visual = layer_norm(w, "sync.visual_norm", linear(w, "vproj", vfeats).flatten(1, 2), eps)
    audio = layer_norm(w, "sync.audio_norm", linear(w, "aproj", afeats).flatten(1, 2), eps)
    x = torch.cat((w["sync.off_token"].expand(batch, -1, -1), visual,
                   w["sync.mod_token"].expand(batch, -1, -1), audio), dim=1) + w["sync.pos_embed"]
    for i in range(num_blocks(w, "sync")):
        x = pre_ln_block(w, f"sync.blocks.{i}", x, cfg.sync_heads, eps)
    return linear(w, "sync.offset_head", layer_norm(w, "sync.norm", x, eps)[:, 0])


def eager_features(w: Weights, video: torch.Tensor, audio: torch.Tensor, cfg: EagerConfig):
    """video (B, S, T, C, H, W), audio (B, S, 1, F, Ta) -> vfeats (B, S, tv, D), afeats
    (B, S, ta, D), one segment at a time."""
    segments = range(video.shape[1])
    vfeats = torch.stack([motionformer_segment(w, video[:, s], cfg) for s in segments], dim=1)
    afeats = torch.stack([ast_segment(w, audio[:, s], cfg) for s in segments], dim=1)
    return vfeats, afeats


def eager_synchformer(w: Weights, video: torch.Tensor, audio: torch.Tensor, cfg: EagerConfig) -> torch.Tensor:
    """Offset logits (B, n_offsets) of the whole model."""
    return sync_logits(w, *eager_features(w, video, audio, cfg), cfg)
