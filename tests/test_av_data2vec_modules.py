"""AV-data2vec building blocks: frontends, fusion, span masks, modality scheduler, encoder,
data2vec targets."""
import ast
import copy
import math
import pathlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from avplugins.modules import attention
from avplugins.modules.av_encoder import (
    AudioFrontend,
    AVData2VecBackbone,
    AVTransformerEncoder,
    ConvPositionalEmbedding,
    EarlyFusion,
    average_top_k_targets,
    instance_norm_over_time,
)
from avplugins.modules.modality import ModalityScheduler
from avplugins.modules.resnet_frontend import ResNetVideoFrontend
from avplugins.modules.span_mask import MaskEmbedding, compute_span_mask

TINY = dict(dim=64, depth=2, heads=4, ffn_dim=256, trunk_width=16, conv_pos=16, conv_pos_groups=4)
MY_MODULES = ["av_encoder.py", "modality.py", "resnet_frontend.py", "span_mask.py"]


def tiny_backbone(**overrides) -> AVData2VecBackbone:
    torch.manual_seed(0)
    return AVData2VecBackbone(**{**TINY, **overrides})


def tiny_encoder(**overrides) -> AVTransformerEncoder:
    torch.manual_seed(0)
    config = dict(dim=32, depth=2, heads=4, ffn_dim=64, conv_pos=8, conv_pos_groups=4)
    return AVTransformerEncoder(**{**config, **overrides})


def masked_runs(row: np.ndarray):
    """Lengths of the maximal runs of True in a 1-D bool array."""
    padded = np.concatenate([[False], row, [False]]).astype(int)
    edges = np.flatnonzero(np.diff(padded))
    return edges[1::2] - edges[0::2]


def test_modules_do_not_import_fairseq():
    modules_dir = pathlib.Path(attention.__file__).parent
    for name in MY_MODULES:
        tree = ast.parse((modules_dir / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                imported = [node.module or ""]
            else:
                continue
            assert not any(n.split(".")[0] == "fairseq" for n in imported), (name, imported)


# ---------------------------------------------------------------- video frontend


def test_resnet_frontend_shapes_base_and_tiny():
    base = ResNetVideoFrontend(768).eval()
    assert base(torch.randn(1, 1, 3, 88, 88)).shape == (1, 3, 768)
    tiny = ResNetVideoFrontend(64, trunk_width=16).eval()
    assert tiny(torch.randn(2, 1, 5, 88, 88)).shape == (2, 5, 64)
    assert tiny.proj.in_features == 128  # widths 16/32/64/128
    with pytest.raises(ValueError, match=r"\(B, 1, T, H, W\)"):
        tiny(torch.randn(2, 3, 5, 88, 88))


def test_resnet_frontend_parameter_count_matches_hand_count():
    # torchvision's ResNet-18 has 11,689,512 parameters; drop its fc (512*1000+1000) and 2-D
    # stem (7*7*3*64 conv + 64+64 BN), add the two PReLUs (one slope per channel) of each
    # of the 8 BasicBlocks, the 3-D stem (5*7*7*64 conv, BN, PReLU) and Linear(512, 768).
    trunk = 11_689_512 - (512 * 1000 + 1000) - 7 * 7 * 3 * 64 - 2 * 64
    prelus = 2 * 2 * (64 + 128 + 256 + 512)
    stem = 5 * 7 * 7 * 64 + 2 * 64 + 64
    proj = 512 * 768 + 768
    frontend = ResNetVideoFrontend(768)
    assert sum(p.numel() for p in frontend.parameters()) == trunk + prelus + stem + proj
    prelu_count = sum(isinstance(m, torch.nn.PReLU) for m in frontend.modules())
    assert prelu_count == 1 + 2 * 8


def test_resnet_frontend_zero_padding_frames_do_not_change_real_frames():
    torch.manual_seed(0)
    frontend = ResNetVideoFrontend(32, trunk_width=8).eval()
    video = torch.randn(1, 1, 6, 88, 88)
    padded = torch.cat([video, torch.zeros(1, 1, 3, 88, 88)], dim=2)
    with torch.no_grad():
        torch.testing.assert_close(frontend(padded)[:, :6], frontend(video))


# ---------------------------------------------------------------- fusion, position conv


def test_audio_frontend_and_fusion_modes():
    torch.manual_seed(0)
    audio = AudioFrontend(16)(torch.randn(2, 5, 104))
    video = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match=r"\(B, T, 104\)"):
        AudioFrontend(16)(torch.randn(2, 5, 26))
    for mode in ("add", "concat"):
        fusion = EarlyFusion(16, mode)
        assert fusion(audio, video).shape == (2, 5, 16)
        # a missing stream is zeros of the other's shape
        torch.testing.assert_close(fusion(audio, None), fusion(audio, torch.zeros_like(audio)))
        torch.testing.assert_close(fusion(None, video), fusion(torch.zeros_like(video), video))
    add = EarlyFusion(16, "add")
    torch.testing.assert_close(add(audio, video), add.norm(audio + video))
    with pytest.raises(ValueError, match="fusion mode"):
        EarlyFusion(16, "sum")
    with pytest.raises(ValueError, match="at least one"):
        add(None, None)


@pytest.mark.parametrize("kernel_size", [8, 7])
def test_conv_positional_embedding_keeps_length_and_maps_to_fairseq_names(kernel_size):
    pos = ConvPositionalEmbedding(12, kernel_size, groups=3)
    assert pos(torch.randn(2, 9, 12)).shape == (2, 9, 12)
    names = dict(pos.named_parameters())
    gain = names["conv.parametrizations.weight.original0"]  # fairseq pos_conv.0.weight_g
    direction = names["conv.parametrizations.weight.original1"]  # fairseq pos_conv.0.weight_v
    assert gain.shape == (1, 1, kernel_size) and direction.shape == (12, 4, kernel_size)
    expected = gain * direction / direction.norm(dim=(0, 1), keepdim=True)
    torch.testing.assert_close(pos.conv.weight, expected)
    torch.testing.assert_close(copy.deepcopy(pos).conv.weight, pos.conv.weight)  # EMA copies
    with pytest.raises(ValueError, match="conv_pos_groups"):
        ConvPositionalEmbedding(10, 8, groups=3)


def test_mlp_activation_dropout_defaults_to_dropout():
    assert attention.Mlp(8, 16, dropout=0.3).activation_dropout.p == 0.3
    block = attention.TransformerBlock(8, 2, dropout=0.3, activation_dropout=0.0)
    assert block.mlp.activation_dropout.p == 0.0 and block.mlp.dropout.p == 0.3


# ---------------------------------------------------------------- encoder


def _layer_norm(x, norm):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def naive_encoder(encoder: AVTransformerEncoder, x, padding_mask):
    """Float64 reference: explicit grouped convolution and softmax attention, same weights."""
    batch, steps, dim = x.shape
    x = x.masked_fill(padding_mask[..., None], 0.0)
    conv = encoder.pos_conv.conv
    gain = conv.parametrizations.weight.original0
    direction = conv.parametrizations.weight.original1
    weight = gain * direction / direction.norm(dim=(0, 1), keepdim=True)  # (D, D/G, K)
    kernel = weight.shape[-1]
    groups = dim // weight.shape[1]
    padded = F.pad(x.transpose(1, 2), (kernel // 2, kernel // 2))
    windows = padded.unfold(2, kernel, 1)[:, :, :steps]  # (B, D, T, K): step t sees t-K//2..
    windows = windows.reshape(batch, groups, dim // groups, steps, kernel)
    grouped_weight = weight.reshape(groups, dim // groups, dim // groups, kernel)
    pos = torch.einsum("bgitk,goik->bgot", windows, grouped_weight).reshape(batch, dim, steps)
    x = x + _gelu(pos + conv.bias[None, :, None]).transpose(1, 2)

    ffn_outputs = []
    for block in encoder.blocks:
        heads, head_dim = block.attn.num_heads, block.attn.head_dim
        h = _layer_norm(x, block.norm1)
        qkv = h @ block.attn.qkv.weight.T + block.attn.qkv.bias
        q, k, v = qkv.reshape(batch, steps, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
        scores = scores.masked_fill(padding_mask[:, None, None, :], float("-inf"))
        weights = torch.exp(scores - scores.amax(-1, keepdim=True))
        weights = weights / weights.sum(-1, keepdim=True)
        attended = (weights @ v).transpose(1, 2).reshape(batch, steps, dim)
        x = x + attended @ block.attn.proj.weight.T + block.attn.proj.bias
        h = _layer_norm(x, block.norm2)
        hidden = _gelu(h @ block.mlp.fc1.weight.T + block.mlp.fc1.bias)
        ffn = hidden @ block.mlp.fc2.weight.T + block.mlp.fc2.bias
        ffn_outputs.append(ffn)
        x = x + ffn
    return _layer_norm(x, encoder.norm), ffn_outputs


@pytest.mark.parametrize("conv_pos", [8, 7])
def test_encoder_matches_float64_naive_recomputation(conv_pos):
    encoder = tiny_encoder(conv_pos=conv_pos).double().eval()
    x = torch.randn(3, 11, 32, dtype=torch.float64)
    padding_mask = torch.zeros(3, 11, dtype=torch.bool)
    padding_mask[1, 8:] = True
    padding_mask[2, 4:] = True
    with torch.no_grad():
        out = encoder(x, padding_mask, return_layer_ffn_outputs=True)
        expected_x, expected_ffn = naive_encoder(encoder, x, padding_mask)
    torch.testing.assert_close(out["x"], expected_x, rtol=1e-10, atol=1e-10)
    assert len(out["layer_results"]) == 2
    for got, expected in zip(out["layer_results"], expected_ffn):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_encoder_padding_invariance():
    encoder = tiny_encoder().eval()
    torch.manual_seed(1)
    short = torch.randn(1, 7, 32)
    garbage = torch.randn(1, 5, 32) * 100  # padding content must not matter
    padded = torch.cat([short, garbage], dim=1)
    padding_mask = torch.zeros(1, 12, dtype=torch.bool)
    padding_mask[:, 7:] = True
    with torch.no_grad():
        alone = encoder(short, return_layer_ffn_outputs=True)
        batched = encoder(padded, padding_mask, return_layer_ffn_outputs=True)
    torch.testing.assert_close(batched["x"][:, :7], alone["x"], rtol=1e-5, atol=1e-5)
    for got, expected in zip(batched["layer_results"], alone["layer_results"]):
        torch.testing.assert_close(got[:, :7], expected, rtol=1e-5, atol=1e-5)


def test_encoder_layerdrop_only_in_training_and_never_for_targets():
    encoder = tiny_encoder(layerdrop=1.0, dropout=0.0, attn_dropout=0.0)
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        skipped = encoder.train()(x)["x"]
        assert len(encoder(x, return_layer_ffn_outputs=True)["layer_results"]) == 2
        torch.testing.assert_close(skipped, encoder.norm(x + encoder.pos_conv(x)))
        evaluated = encoder.eval()(x)["x"]
    assert not torch.allclose(evaluated, skipped)
    with pytest.raises(ValueError, match="padding_mask"):
        encoder(x, torch.zeros(2, 6))


# ---------------------------------------------------------------- backbone


def test_backbone_shapes_base_and_tiny():
    torch.manual_seed(0)
    base = AVData2VecBackbone().eval()
    assert len(base.encoder.blocks) == 12 and base.encoder.blocks[0].mlp.fc1.out_features == 3072
    audio, video = torch.randn(1, 4, 104), torch.randn(1, 1, 4, 88, 88)
    with torch.no_grad():
        out = base(audio, video, return_layer_ffn_outputs=True)
    assert out["x"].shape == (1, 4, 768) and len(out["layer_results"]) == 12

    tiny = tiny_backbone(fusion="concat").eval()
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, 1:3] = True
    single_streams = (dict(audio=torch.randn(2, 6, 104)), dict(video=torch.randn(2, 1, 6, 88, 88)))
    with torch.no_grad():
        for kwargs in single_streams:
            out = tiny(**kwargs, mask=mask)
            assert out["x"].shape == out["features"].shape == (2, 6, 64)
            assert out["layer_results"] == []
    with pytest.raises(ValueError, match="video length"):
        tiny(torch.randn(1, 5, 104), torch.randn(1, 1, 6, 88, 88))
    with pytest.raises(ValueError, match="mask must be"):
        tiny(torch.randn(1, 5, 104), mask=torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="audio, video or both"):
        tiny()


def test_backbone_per_sample_modalities_zero_the_absent_stream():
    backbone = tiny_backbone().eval()
    audio, video = torch.randn(2, 5, 104), torch.randn(2, 1, 5, 88, 88)
    use_audio = torch.tensor([True, False])
    use_video = torch.tensor([False, True])
    with torch.no_grad():
        mixed = backbone.embed(audio, video, use_audio, use_video)
        torch.testing.assert_close(mixed[0], backbone.embed(audio, None)[0])
        torch.testing.assert_close(mixed[1], backbone.embed(None, video)[1])
    with pytest.raises(ValueError, match="every sample needs audio or video"):
        backbone.embed(audio, video, use_audio, torch.tensor([False, False]))
    with pytest.raises(ValueError, match="every sample needs audio or video"):
        backbone.embed(audio, None, use_audio)


def test_backbone_padding_invariance():
    backbone = tiny_backbone().eval()
    audio, video = torch.randn(1, 6, 104), torch.randn(1, 1, 6, 88, 88)
    # audio padding may hold anything; video padding frames are zeros (the stem's 5-frame
    # temporal kernel sees them before any mask applies)
    padded_audio = torch.cat([audio, torch.randn(1, 3, 104)], dim=1)
    padded_video = torch.cat([video, torch.zeros(1, 1, 3, 88, 88)], dim=2)
    padding_mask = torch.tensor([[False] * 6 + [True] * 3])
    mask = torch.tensor([[False, True, True, False, False, False]])
    with torch.no_grad():
        alone = backbone(audio, video, mask=mask, return_layer_ffn_outputs=True)
        padded = backbone(
            padded_audio, padded_video, padding_mask, F.pad(mask, (0, 3)), True
        )
    torch.testing.assert_close(padded["x"][:, :6], alone["x"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded["layer_results"][-1][:, :6], alone["layer_results"][-1])


def test_gradient_reaches_every_parameter():
    backbone = tiny_backbone().train()
    torch.manual_seed(2)
    audio, video = torch.randn(2, 8, 104), torch.randn(2, 1, 8, 88, 88)
    padding_mask = torch.zeros(2, 8, dtype=torch.bool)
    padding_mask[1, 6:] = True
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, 2:5] = True
    out = backbone(audio, video, padding_mask, mask, return_layer_ffn_outputs=True)
    # random projections: a plain sum of LayerNorm outputs has no gradient upstream
    loss = (out["x"] * torch.randn_like(out["x"])).sum()
    loss = loss + sum((r * torch.randn_like(r)).sum() for r in out["layer_results"])
    loss.backward()
    for name, parameter in backbone.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


# ---------------------------------------------------------------- span masks


def test_span_mask_fraction_matches_fairseq_compute_mask_indices():
    from fairseq.data.data_utils import compute_mask_indices

    batch, steps = 3000, 100
    lengths = torch.randint(60, steps + 1, (batch,), generator=torch.Generator().manual_seed(0))
    padding_mask = torch.arange(steps)[None, :] >= lengths[:, None]
    for padding in (None, padding_mask):
        reference = compute_mask_indices(
            (batch, steps), padding, mask_prob=0.5, mask_length=10, min_masks=2,
            require_same_masks=False, seed=1, epoch=1, indices=torch.arange(batch),
        )
        ours = compute_span_mask(
            batch, steps, 0.5, 10, padding, torch.Generator().manual_seed(1), min_masks=2
        )
        reference_fraction = reference.sum() / (batch * steps if padding is None else lengths.sum())
        our_fraction = ours.sum().item() / (batch * steps if padding is None else lengths.sum())
        assert abs(float(our_fraction) - float(reference_fraction)) < 0.01
        assert 0.38 < float(our_fraction) < 0.44  # overlaps: well below mask_prob = 0.5


def test_span_mask_runs_are_whole_spans_and_skip_padding():
    batch, steps = 200, 60
    lengths = torch.randint(25, steps + 1, (batch,), generator=torch.Generator().manual_seed(3))
    padding_mask = torch.arange(steps)[None, :] >= lengths[:, None]
    mask = compute_span_mask(batch, steps, 0.5, 10, padding_mask, torch.Generator().manual_seed(4))
    assert not (mask & padding_mask).any()
    for row, length in zip(mask.numpy(), lengths.tolist()):
        runs = masked_runs(row)
        assert len(runs) >= 1 and (runs >= 10).all()  # unions of whole spans, min_masks 2
        assert row[:length].sum() < length
    single = compute_span_mask(50, 40, 0.0, 7, generator=torch.Generator().manual_seed(5),
                               min_masks=1)
    assert all(masked_runs(row).tolist() == [7] for row in single.numpy())


def test_span_mask_never_masks_a_whole_sequence():
    lengths = torch.tensor([0, 1, 10, 11, 21, 40])
    padding_mask = torch.arange(40)[None, :] >= lengths[:, None]
    for seed in range(20):
        mask = compute_span_mask(6, 40, 5.0, 10, padding_mask, torch.Generator().manual_seed(seed))
        counts = mask.sum(1).tolist()
        assert counts[:3] == [0, 0, 0]  # at most span_length valid steps: left unmasked
        assert counts[3] == 10 and 10 <= counts[4] <= 20 and counts[5] < 40


def test_span_mask_is_reproducible_and_validates():
    first = compute_span_mask(4, 50, generator=torch.Generator().manual_seed(9))
    second = compute_span_mask(4, 50, generator=torch.Generator().manual_seed(9))
    assert torch.equal(first, second) and first.dtype == torch.bool and first.shape == (4, 50)
    with pytest.raises(ValueError, match="mask_prob"):
        compute_span_mask(2, 10, mask_prob=-0.1)
    with pytest.raises(ValueError, match="span_length"):
        compute_span_mask(2, 10, span_length=0)
    with pytest.raises(ValueError, match="padding_mask"):
        compute_span_mask(2, 10, padding_mask=torch.zeros(2, 9, dtype=torch.bool))


def test_mask_embedding_replaces_masked_steps_only():
    embedding = MaskEmbedding(4)
    x = torch.randn(2, 3, 4)
    mask = torch.tensor([[True, False, False], [False, False, True]])
    out = embedding(x, mask)
    torch.testing.assert_close(out[mask], embedding.embedding.detach().expand(2, 4))
    torch.testing.assert_close(out[~mask], x[~mask])


# ---------------------------------------------------------------- modality scheduler


def test_modality_scheduler_endpoints_and_linear_middle():
    scheduler = ModalityScheduler(0.5, 0.2, 0.8, 0.4, num_updates=100)
    assert scheduler.probabilities(0) == pytest.approx((0.5, 0.5 * 0.8, 0.5 * 0.2))
    assert scheduler.probabilities(50) == pytest.approx((0.35, 0.65 * 0.6, 0.65 * 0.4))
    assert scheduler.probabilities(100) == pytest.approx((0.2, 0.8 * 0.4, 0.8 * 0.6))
    assert scheduler.probabilities(10_000) == scheduler.probabilities(100)
    assert ModalityScheduler(0.5, 0.2, 0.8, 0.4, 0).probabilities(0) == pytest.approx(
        (0.2, 0.32, 0.48)
    )
    for update in (0, 30, 77, 200):
        assert sum(scheduler.probabilities(update)) == pytest.approx(1.0)


def test_modality_scheduler_sampling_frequencies():
    scheduler = ModalityScheduler(0.5, 0.2, 0.8, 0.4, num_updates=100)
    use_audio, use_video = scheduler.sample(20_000, 50, torch.Generator().manual_seed(0))
    assert use_audio.dtype == torch.bool and use_audio.shape == (20_000,)
    assert (use_audio | use_video).all()
    frequencies = [
        (use_audio & use_video).float().mean().item(),
        (use_audio & ~use_video).float().mean().item(),
        (~use_audio & use_video).float().mean().item(),
    ]
    assert frequencies == pytest.approx(scheduler.probabilities(50), abs=0.015)
    audio_only, video_absent = ModalityScheduler(0, 0, 1, 1, 10).sample(100, 3)
    assert audio_only.all() and not video_absent.any()


@pytest.mark.parametrize(
    "field, kwargs",
    [
        ("p_av_start", dict(p_av_start=1.5)),
        ("p_av_end", dict(p_av_end=-0.1)),
        ("p_audio_given_not_av_start", dict(p_audio_given_not_av_start=2.0)),
        ("p_audio_given_not_av_end", dict(p_audio_given_not_av_end=-1.0)),
        ("num_updates", dict(num_updates=-5)),
    ],
)
def test_modality_scheduler_rejects_bad_values(field, kwargs):
    valid = dict(p_av_start=0.5, p_av_end=0.5, p_audio_given_not_av_start=0.5,
                 p_audio_given_not_av_end=0.5, num_updates=10)
    with pytest.raises(ValueError, match=field):
        ModalityScheduler(**{**valid, **kwargs})


# ---------------------------------------------------------------- data2vec targets


def test_instance_norm_over_time_known_answer():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 5, dtype=torch.float64) * 3 + 7
    padding_mask = torch.zeros(2, 9, dtype=torch.bool)
    padding_mask[1, 6:] = True
    x[1, 6:] = 1e6  # padding must not enter the statistics
    normed = instance_norm_over_time(x, padding_mask)
    valid = normed[1, :6]
    torch.testing.assert_close(valid.mean(0), torch.zeros(5, dtype=torch.float64), atol=1e-12,
                               rtol=0)
    torch.testing.assert_close(valid.var(0, unbiased=False),
                               torch.ones(5, dtype=torch.float64), atol=1e-5, rtol=0)
    assert (normed[1, 6:] == 0).all()
    # data2vec's form on an unpadded sequence: F.instance_norm over (B, C, T), eps 1e-5
    expected = F.instance_norm(x[:1].transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(normed[:1], expected)
    torch.testing.assert_close(instance_norm_over_time(x[:1]), expected)
    assert instance_norm_over_time(x.half()).dtype == torch.float32


def test_average_top_k_targets_known_answer():
    # Layers that are affine maps a * z + b of unit-variance, zero-mean sequences z
    # instance-normalise back to z (up to eps), so the target is the mean of the top-k z.
    torch.manual_seed(0)
    zs = [instance_norm_over_time(torch.randn(2, 12, 3, dtype=torch.float64), eps=0.0)
          for _ in range(4)]
    layers = [(i + 2.0) * z + i for i, z in enumerate(zs)]
    target = average_top_k_targets(layers, k=2, eps=0.0)
    torch.testing.assert_close(target, (zs[2] + zs[3]) / 2)
    torch.testing.assert_close(average_top_k_targets(layers, k=1, eps=0.0), zs[3])
    with pytest.raises(ValueError, match="average_top_k_layers"):
        average_top_k_targets(layers, k=5)
    with pytest.raises(ValueError, match="average_top_k_layers"):
        average_top_k_targets(layers, k=0)
