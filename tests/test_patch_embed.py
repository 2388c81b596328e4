"""embed_patches: one matrix product in place of a non-overlapping Conv2d / Conv3d, checked
against the convolution itself (float64) in forward and backward."""
import pytest
import torch
from torch import nn

from avplugins.modules.patch_embed import embed_patches, is_non_overlapping


@pytest.mark.parametrize(
    "conv, input_shape",
    [
        (nn.Conv3d(3, 8, kernel_size=(2, 4, 4), stride=(2, 4, 4)), (2, 3, 6, 12, 8)),  # Motionformer tubelets
        (nn.Conv3d(3, 5, kernel_size=(4, 8, 8), stride=(4, 8, 8)), (3, 3, 4, 16, 16)),  # one slot
        (nn.Conv2d(1, 6, kernel_size=8, stride=8), (2, 1, 20, 17)),  # remainder rows/columns dropped
        (nn.Conv2d(2, 4, kernel_size=(3, 5), stride=(3, 5), bias=False), (2, 2, 9, 10)),
    ],
)
def test_embed_patches_equals_convolution(conv, input_shape):
    torch.manual_seed(0)
    conv = conv.double()
    inputs = torch.randn(input_shape, dtype=torch.float64, requires_grad=True)
    reference = conv(inputs)
    fast = embed_patches(inputs, conv)
    assert fast.shape == reference.shape
    torch.testing.assert_close(fast, reference, rtol=1e-12, atol=1e-12)

    upstream = torch.randn_like(reference)
    grads_reference = torch.autograd.grad(reference, [inputs, *conv.parameters()], upstream)
    grads_fast = torch.autograd.grad(fast, [inputs, *conv.parameters()], upstream)
    for fast_grad, reference_grad in zip(grads_fast, grads_reference):
        torch.testing.assert_close(fast_grad, reference_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(1, 4, kernel_size=4, stride=2),  # AST's overlapping patches (16, stride 10)
        nn.Conv2d(1, 4, kernel_size=4, stride=4, padding=1),
        nn.Conv3d(2, 4, kernel_size=2, stride=2, groups=2),
        nn.Conv2d(1, 4, kernel_size=2, stride=2, dilation=2),
    ],
)
def test_overlapping_or_unusual_convolutions_fall_back(conv):
    assert not is_non_overlapping(conv)
    inputs = torch.randn(2, conv.in_channels, *([9] * (conv.weight.ndim - 2)))
    torch.testing.assert_close(embed_patches(inputs, conv), conv(inputs), rtol=0, atol=0)


def test_non_overlapping_is_recognised():
    assert is_non_overlapping(nn.Conv3d(3, 8, kernel_size=(2, 16, 16), stride=(2, 16, 16)))
    assert is_non_overlapping(nn.Conv2d(1, 8, kernel_size=64, stride=64, padding="valid"))
