"""ResNet-18 lip-reading frontend with a 3-D stem (the AV-HuBERT / AV-data2vec video frontend).

A spatio-temporal stem sees 5 neighbouring frames, then a 2-D ResNet-18 trunk encodes every
frame on its own, and a linear layer maps the pooled 512 channels to the model width.
Layer layout follows AV-HuBERT's ``avhubert/resnet.py`` (PReLU after the stem and after each
convolution pair of a BasicBlock, 1x1 convolution + BN shortcut when the shape changes).

Parameter names map onto AV-HuBERT's ``ResEncoder`` by renaming ``stem.`` -> ``frontend3D.``,
``trunk.{i}.`` -> ``trunk.layer{i+1}.``, ``act1/act2`` -> ``relu1/relu2``,
``shortcut.`` -> ``downsample.``; AV-HuBERT keeps ``proj`` outside the ResNet.
"""
from typing import Sequence

import torch
from torch import nn

RESNET18_BLOCKS_PER_STAGE = (2, 2, 2, 2)


class BasicBlock(nn.Module):
    """ResNet BasicBlock with PReLU: ``prelu2(bn2(conv2(prelu1(bn1(conv1(x))))) + shortcut(x))``.

    Args:
        in_channels, out_channels: channel counts.
        stride: stride of the first 3x3 convolution (and of the shortcut).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.act1 = nn.PReLU(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.act2 = nn.PReLU(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, C_out, ceil(H / stride), ceil(W / stride))."""
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


def make_resnet_stage(
    in_channels: int, out_channels: int, num_blocks: int, stride: int
) -> nn.Sequential:
    """``num_blocks`` BasicBlocks; only the first one changes stride and width."""
    blocks = [BasicBlock(in_channels, out_channels, stride)]
    blocks += [BasicBlock(out_channels, out_channels) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


class ResNetVideoFrontend(nn.Module):
    """Grayscale mouth crops -> one feature vector per frame.

    Args:
        out_dim: output width D (the transformer width).
        trunk_width: channels of the stem and of the first stage; the stages have
            ``trunk_width * (1, 2, 4, 8)`` channels (64 -> 64/128/256/512 = ResNet-18; a tiny
            config may use 16 -> 16/32/64/128).
        blocks_per_stage: BasicBlocks per stage ((2, 2, 2, 2) = ResNet-18).
        stem_pool: end the stem with the 3x3 stride-2 max-pool (ResNet-18, AV-HuBERT). False
            keeps twice the resolution in the trunk (4x its compute): for small crops, where
            the pool would shrink a 28-pixel crop to 7 x 7 and the lip opening to a pixel.

    Shapes: ``forward`` maps (B, 1, T, H, W) float video (88 x 88 crops in the recipes) to
    (B, T, out_dim). The stem keeps T (stride 1, padding 2 in time), so output step t is
    video frame t. Zero frames appended as padding leave the features of the real frames
    unchanged in eval mode (the stem pads time with zeros itself).
    """

    def __init__(
        self,
        out_dim: int,
        trunk_width: int = 64,
        blocks_per_stage: Sequence[int] = RESNET18_BLOCKS_PER_STAGE,
        stem_pool: bool = True,
    ):
        super().__init__()
        widths = [trunk_width * 2**stage for stage in range(len(blocks_per_stage))]
        stem = [
            nn.Conv3d(1, trunk_width, (5, 7, 7), stride=(1, 2, 2), padding=(2, 3, 3), bias=False),
            nn.BatchNorm3d(trunk_width),
            nn.PReLU(trunk_width),
        ]
        if stem_pool:
            stem.append(nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)))
        self.stem = nn.Sequential(*stem)
        stage_inputs = [trunk_width] + widths[:-1]
        self.trunk = nn.Sequential(
            *[
                make_resnet_stage(in_ch, out_ch, num_blocks, stride=1 if stage == 0 else 2)
                for stage, (in_ch, out_ch, num_blocks) in enumerate(
                    zip(stage_inputs, widths, blocks_per_stage)
                )
            ]
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.proj = nn.Linear(widths[-1], out_dim)
        self.reset_trunk_parameters()

    def reset_trunk_parameters(self) -> None:
        """AV-HuBERT's trunk init: He-normal (fan-out) convolutions, BN scale 1 and shift 0.
        The stem keeps PyTorch's default init, as in the reference."""
        for module in self.trunk.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 1, T, H, W) -> (B, T, out_dim)."""
        if video.ndim != 5 or video.shape[1] != 1:
            raise ValueError(
                f"video must be (B, 1, T, H, W) grayscale frames, got shape {tuple(video.shape)}"
            )
        batch, _, num_frames = video.shape[:3]
        x = self.stem(video)  # (B, C, T, H', W')
        x = x.transpose(1, 2).flatten(0, 1)  # (B*T, C, H', W'): the trunk sees single frames
        x = self.pool(self.trunk(x)).flatten(1)  # (B*T, widths[-1])
        return self.proj(x.view(batch, num_frames, -1))
