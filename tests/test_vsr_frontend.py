"""The ResNet video frontend's ``stem_pool`` option (small mouth crops) and its config wiring."""
import pytest
import torch
import torch.nn.functional as F

from avplugins.models.av_data2vec import AVBackboneConfig, TINY_BACKBONE, build_backbone
from avplugins.models.av_data2vec_seq2seq import AVData2VecSeq2SeqConfig, pretrained_shapes
from avplugins.modules.resnet_frontend import ResNetVideoFrontend


def frames(batch=2, num_frames=6, size=28, seed=0):
    """(B, 1, T, H, W) random normalised crops."""
    return torch.randn(batch, 1, num_frames, size, size, generator=torch.Generator().manual_seed(seed))


def reference_forward(frontend: ResNetVideoFrontend, video: torch.Tensor, pool: bool) -> torch.Tensor:
    """Independent recomputation of the frontend (eval mode) from its weights with functional
    ops: stem conv -> BN -> PReLU -> [3x3 stride-2 max-pool] -> per-frame trunk -> mean -> proj."""
    conv, bn, act = frontend.stem[0], frontend.stem[1], frontend.stem[2]
    x = F.conv3d(video, conv.weight, stride=(1, 2, 2), padding=(2, 3, 3))
    x = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    x = F.prelu(x, act.weight)
    if pool:
        x = F.max_pool3d(x, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
    batch, channels, num_frames = x.shape[:3]
    x = x.transpose(1, 2).reshape(batch * num_frames, channels, *x.shape[-2:])
    x = frontend.trunk(x).mean(dim=(2, 3))
    return frontend.proj(x.view(batch, num_frames, -1))


def randomise_batch_norm(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial BN statistics and affine parameters, so eval-mode outputs depend on them."""
    generator = torch.Generator().manual_seed(seed)
    for bn in module.modules():
        if isinstance(bn, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
            size = bn.num_features
            bn.running_mean.copy_(torch.randn(size, generator=generator) * 0.1)
            bn.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
            bn.weight.data.copy_(torch.rand(size, generator=generator) + 0.5)
            bn.bias.data.copy_(torch.randn(size, generator=generator) * 0.1)


@pytest.mark.parametrize("pool", [True, False])
def test_frontend_matches_functional_recomputation(pool):
    torch.manual_seed(0)
    frontend = ResNetVideoFrontend(32, trunk_width=8, stem_pool=pool).eval()
    randomise_batch_norm(frontend, seed=1)
    video = frames()
    with torch.no_grad():
        out = frontend(video)
        expected = reference_forward(frontend, video, pool)
    assert out.shape == (2, 6, 32)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_default_is_the_pooled_resnet18_stem():
    torch.manual_seed(0)
    default = ResNetVideoFrontend(32, trunk_width=8)
    torch.manual_seed(0)
    pooled = ResNetVideoFrontend(32, trunk_width=8, stem_pool=True)
    assert isinstance(default.stem[-1], torch.nn.MaxPool3d)
    video = frames()
    with torch.no_grad():
        torch.testing.assert_close(default.eval()(video), pooled.eval()(video), rtol=0, atol=0)


@pytest.mark.parametrize("size, pool, trunk_side", [(28, True, 7), (28, False, 14), (44, True, 11), (44, False, 22)])
def test_stem_output_resolution(size, pool, trunk_side):
    """Stride 2 in the stem halves the crop; the max-pool halves it again (ceil)."""
    frontend = ResNetVideoFrontend(16, trunk_width=4, stem_pool=pool).eval()
    with torch.no_grad():
        stem_out = frontend.stem(frames(1, 5, size))
    assert stem_out.shape == (1, 4, 5, trunk_side, trunk_side)


def test_options_share_parameter_names_and_shapes():
    """A checkpoint of one variant loads into the other (the pool has no parameters)."""
    pooled = ResNetVideoFrontend(32, trunk_width=8, stem_pool=True)
    unpooled = ResNetVideoFrontend(32, trunk_width=8, stem_pool=False)
    unpooled.load_state_dict(pooled.state_dict())
    assert {k: v.shape for k, v in pooled.state_dict().items()} == {
        k: v.shape for k, v in unpooled.state_dict().items()
    }


def test_backbone_config_wires_the_option():
    assert AVBackboneConfig().resnet_stem_pool is True
    pooled = build_backbone(AVBackboneConfig(**TINY_BACKBONE))
    unpooled = build_backbone(AVBackboneConfig(**TINY_BACKBONE, resnet_stem_pool=False))
    assert isinstance(pooled.video_frontend.stem[-1], torch.nn.MaxPool3d)
    assert not any(isinstance(m, torch.nn.MaxPool3d) for m in unpooled.video_frontend.modules())
    assert unpooled.video_frontend.proj.out_features == TINY_BACKBONE["encoder_embed_dim"]
    video = frames(1, 4, 28)
    with torch.no_grad():
        assert unpooled.eval().video_frontend(video).shape == (1, 4, TINY_BACKBONE["encoder_embed_dim"])


def test_finetuning_adopts_the_pretrained_stem_and_defaults_for_old_checkpoints():
    finetune_cfg = AVData2VecSeq2SeqConfig(**TINY_BACKBONE)
    pretrained = dict(vars(AVBackboneConfig(**TINY_BACKBONE, resnet_stem_pool=False)))
    assert pretrained_shapes(finetune_cfg, pretrained)["resnet_stem_pool"] is False
    del pretrained["resnet_stem_pool"]  # a checkpoint written before the option existed
    assert pretrained_shapes(finetune_cfg, pretrained)["resnet_stem_pool"] is True
