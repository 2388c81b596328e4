"""Patch embedding by one matrix product when patches do not overlap.

A convolution whose stride equals its kernel (no padding, no dilation, one group) cuts the
input into disjoint patches and projects each one: the same as reshaping the patches into rows
and multiplying by the flattened kernel. On CPU the matrix product is much faster than
PyTorch's Conv3d, above all in backward (Motionformer's tubelets; the tiny towers' large patches).
The module keeps its ``nn.Conv*d`` parameters, so checkpoints are unchanged.
"""
import torch
import torch.nn.functional as F
from torch import nn


def is_non_overlapping(conv: nn.Module) -> bool:
    """True if ``conv`` (Conv2d / Conv3d) cuts disjoint patches: stride == kernel, no padding,
    no dilation, one group."""
    if isinstance(conv.padding, str) and conv.padding != "valid":
        return False
    padding = (0,) if isinstance(conv.padding, str) else tuple(conv.padding)
    return (
        tuple(conv.stride) == tuple(conv.kernel_size)
        and all(p == 0 for p in padding)
        and all(d == 1 for d in conv.dilation)
        and conv.groups == 1
    )


def embed_patches(inputs: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """``conv(inputs)``, computed as one matrix product when the patches do not overlap.

    Args:
        inputs: (N, C, *spatial) with 2 or 3 spatial axes (F, Ta) or (T, H, W).
        conv: the ``nn.Conv2d`` / ``nn.Conv3d`` patch projection (weight (D, C, *kernel)).
    Returns:
        (N, D, *grid) with grid = spatial // kernel per axis (a remainder is dropped, as the
        convolution does).
    """
    if not is_non_overlapping(conv):
        return conv(inputs)
    kernel = tuple(conv.kernel_size)
    grid = [size // k for size, k in zip(inputs.shape[2:], kernel)]
    num_axes = len(kernel)
    covered = inputs[(slice(None), slice(None)) + tuple(slice(0, g * k) for g, k in zip(grid, kernel))]
    # (N, C, g1, k1, g2, k2, ...) -> (N, g1, g2, ..., C, k1, k2, ...)
    split = covered.reshape(inputs.shape[0], inputs.shape[1], *[d for g, k in zip(grid, kernel) for d in (g, k)])
    grid_axes = [2 + 2 * i for i in range(num_axes)]
    kernel_axes = [3 + 2 * i for i in range(num_axes)]
    patches = split.permute(0, *grid_axes, 1, *kernel_axes).flatten(1 + num_axes)
    projected = F.linear(patches, conv.weight.flatten(1), conv.bias)  # (N, *grid, D)
    return projected.permute(0, num_axes + 1, *range(1, num_axes + 1))
