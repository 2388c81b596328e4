"""Synchformer modules (Motionformer, AST, sync module, the composed net) and the safe importer
of official checkpoints: shapes and parameter counts at the paper's size, an independent
float64 oracle for the divided attention, eval-mode determinism, and the loader's refusals."""
import math
import pickle

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from avplugins.convert.synchformer import (
    SYNC,
    SYNCHRONIZABILITY,
    STAGE1,
    checkpoint_filter_fn,
    fit_sync_positions,
    load_official_checkpoint,
)
from avplugins.modules.ast import AudioSpectrogramTransformer
from avplugins.modules.attention import TransformerBlock
from avplugins.modules.motionformer import ClsAggregator, DividedSpaceTimeAttention, Motionformer
from avplugins.modules.sync_transformer import SyncTransformer
from avplugins.modules.synchformer_net import SynchformerNet, pooled_segment_embeddings

# official Motionformer checkpoints also hold an unused 2-D patch embedding (Conv2d 3 -> 768,
# 16 x 16) that the importer drops; the paper's 122.4 M counts it
UNUSED_OFFICIAL_PATCH_EMBED = 768 * 3 * 16 * 16 + 768


def tiny_net(image_size=224, rates=None):
    """The fixtures' tiny configuration (fixtures/README 'Tiny configuration'), optionally on
    smaller frames."""
    rates = rates or {}
    return SynchformerNet.build(
        num_segments=2,
        visual_args=dict(
            image_size=image_size, dim=64, depth=2, num_heads=4, num_frames=4,
            **rates.get("visual", {}),
        ),
        audio_args=dict(dim=48, depth=2, num_heads=4, **rates.get("audio", {})),
        sync_args=dict(dim=32, depth=2, num_heads=4, **rates.get("sync", {})),
    )


def tiny_inputs(batch=2, image_size=224, seed=0):
    generator = torch.Generator().manual_seed(seed)
    segments = 2
    video = torch.randn(batch, segments, 4, 3, image_size, image_size, generator=generator)
    audio = torch.randn(batch, segments, 1, 128, 66, generator=generator)
    return video, audio


def num_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def base_net_on_meta():
    with torch.device("meta"):
        return SynchformerNet.build().eval()


def test_base_parameter_counts_match_paper(base_net_on_meta):
    net = base_net_on_meta
    assert round(num_params(net.audio) / 1e6, 1) == 92.4
    assert round(num_params(net.sync) / 1e6, 1) == 21.4
    assert round((num_params(net.vproj) + num_params(net.aproj)) / 1e6, 1) == 1.2
    assert round(num_params(net.visual) / 1e6, 1) == 121.9
    assert round((num_params(net.visual) + UNUSED_OFFICIAL_PATCH_EMBED) / 1e6, 1) == 122.4
    # the official full model (fixtures/README) has 237,460,245 parameters
    assert num_params(net) + UNUSED_OFFICIAL_PATCH_EMBED == 237_460_245


def test_base_forward_shapes_on_meta(base_net_on_meta):
    video = torch.empty(2, 14, 16, 3, 224, 224, device="meta")
    audio = torch.empty(2, 14, 1, 128, 66, device="meta")
    with torch.no_grad():
        vfeats, afeats = base_net_on_meta.forward_features(video, audio)
        tokens = base_net_on_meta.sync_tokens(vfeats, afeats)
        out = base_net_on_meta.forward_head(vfeats, afeats)
    assert vfeats.shape == (2, 14, 8, 768)
    assert afeats.shape == (2, 14, 6, 768)
    assert tokens.shape == (2, 198, 768)
    assert set(out) == {"offset_logits"} and out["offset_logits"].shape == (2, 21)


def test_synchronizability_variant_has_184_positions_and_sync_head():
    with torch.device("meta"):
        net = SynchformerNet.build(
            num_segments=13, sync_args=dict(num_offset_classes=0, sync_head=True)
        ).eval()
    assert net.sync.pos_embed.shape == (1, 184, 768)
    with torch.no_grad():
        out = net(torch.empty(1, 13, 16, 3, 224, 224, device="meta"),
                  torch.empty(1, 13, 1, 128, 66, device="meta"))
    assert set(out) == {"sync_logits"} and out["sync_logits"].shape == (1, 2)


def reference_divided_attention(attention, x, num_slots, axis):
    """Independent float64 oracle: full softmax attention over all tokens with a mask that
    lets CLS see everything and each patch see CLS plus its own slot (space) / position (time)."""
    batch, num_tokens, dim = x.shape
    heads, head_dim = attention.num_heads, attention.head_dim
    num_patches = (num_tokens - 1) // num_slots
    q, k, v = (x @ attention.qkv.weight.T + attention.qkv.bias).split(dim, dim=-1)
    q, k, v = (t.reshape(batch, num_tokens, heads, head_dim).transpose(1, 2) for t in (q, k, v))
    slot = torch.tensor([-1] + [i // num_patches for i in range(num_tokens - 1)])
    position = torch.tensor([-1] + [i % num_patches for i in range(num_tokens - 1)])
    key_of = slot if axis == "space" else position
    allowed = (key_of[:, None] == key_of[None, :]) | (torch.arange(num_tokens) == 0)[None, :]
    allowed[0, :] = True
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(batch, num_tokens, dim)
    return out @ attention.proj.weight.T + attention.proj.bias


@pytest.mark.parametrize("axis", ["space", "time"])
def test_divided_attention_matches_float64_masked_oracle(axis):
    torch.manual_seed(0)
    attention = DividedSpaceTimeAttention(dim=16, num_heads=2).double().eval()
    x = torch.randn(3, 1 + 3 * 5, 16, dtype=torch.float64)
    with torch.no_grad():
        ours = attention(x, num_slots=3, axis=axis)
        expected = reference_divided_attention(attention, x, num_slots=3, axis=axis)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)
    other = "time" if axis == "space" else "space"
    with torch.no_grad():
        assert (attention(x, num_slots=3, axis=other) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("axis", ["space", "time"])
def test_divided_attention_bias_folded_at_inference_matches_oracle_and_autograd_path(axis):
    """Without autograd the qkv bias is added while regrouping (and to the CLS query / output
    only); with non-zero biases both paths equal the float64 oracle."""
    torch.manual_seed(0)
    attention = DividedSpaceTimeAttention(dim=16, num_heads=2).double().eval()
    with torch.no_grad():
        attention.qkv.bias.normal_()
        attention.proj.bias.normal_()
    x = torch.randn(3, 1 + 3 * 5, 16, dtype=torch.float64)
    expected = reference_divided_attention(attention, x, num_slots=3, axis=axis).detach()
    with torch.inference_mode():
        folded = attention(x, num_slots=3, axis=axis)
    with_autograd = attention(x, num_slots=3, axis=axis)
    assert with_autograd.requires_grad
    torch.testing.assert_close(folded, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(with_autograd.detach(), expected, rtol=0, atol=1e-12)
    with torch.no_grad():
        attention.qkv.bias[32:].zero_()  # the value bias does reach the output
        assert (attention(x, num_slots=3, axis=axis) - expected).abs().max() > 1e-3


def test_block_first_queries_equal_the_full_block_in_float64():
    """``num_queries=Q`` computes the full block's first Q outputs (and MLP branch), padding
    included, with the same gradients; the queries still attend to every token."""
    torch.manual_seed(0)
    block = TransformerBlock(dim=16, num_heads=2, mlp_ratio=2.0).double().eval()
    x = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[1, 5:] = True
    full, full_ffn = block(x, key_padding_mask=padding, return_ffn_output=True)
    first, first_ffn = block(x, key_padding_mask=padding, return_ffn_output=True, num_queries=2)
    assert first.shape == (3, 2, 16)
    torch.testing.assert_close(first, full[:, :2], rtol=0, atol=1e-12)
    torch.testing.assert_close(first_ffn, full_ffn[:, :2], rtol=0, atol=1e-12)
    (grad_full,) = torch.autograd.grad(full[:, :2].square().sum(), x)
    (grad_first,) = torch.autograd.grad(first.square().sum(), x)
    torch.testing.assert_close(grad_first, grad_full, rtol=0, atol=1e-12)
    assert grad_first[:, 2:].abs().max() > 1e-3  # the other tokens feed the queries as keys
    with torch.no_grad():
        assert (block(x[:, :2]) - first).abs().max() > 1e-3


def test_cls_aggregator_equals_the_full_block_cls_output_in_float64():
    torch.manual_seed(0)
    aggregator = ClsAggregator(dim=16, num_heads=2).double().eval()
    torch.nn.init.normal_(aggregator.cls_token)
    tokens = torch.randn(4, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        cls = aggregator.cls_token.expand(4, -1, -1)
        expected = aggregator.block(torch.cat((cls, tokens), dim=1))[:, 0]
        torch.testing.assert_close(aggregator(tokens), expected, rtol=0, atol=1e-12)


def test_tiny_net_float32_agrees_with_float64_recomputation():
    torch.manual_seed(0)
    net = tiny_net(image_size=64).eval()
    video, audio = tiny_inputs(image_size=64)
    with torch.no_grad():
        out32 = net(video, audio)["offset_logits"]
        tokens32 = net.sync_tokens(*net.forward_features(video, audio))
        net64 = net.double()
        out64 = net64(video.double(), audio.double())["offset_logits"]
        tokens64 = net64.sync_tokens(*net64.forward_features(video.double(), audio.double()))
    torch.testing.assert_close(out32.double(), out64, rtol=0, atol=1e-5)
    torch.testing.assert_close(tokens32.double(), tokens64, rtol=0, atol=1e-5)


def test_dropout_and_drop_path_are_off_in_eval():
    rates = {
        "visual": dict(dropout=0.5, attn_dropout=0.5, drop_path=0.5),
        "audio": dict(dropout=0.5, attn_dropout=0.5, drop_path=0.5),
        "sync": dict(dropout=0.5, attn_dropout=0.5),
    }
    torch.manual_seed(0)
    noisy = tiny_net(image_size=64, rates=rates)
    clean = tiny_net(image_size=64)
    clean.load_state_dict(noisy.state_dict(), strict=True)
    video, audio = tiny_inputs(batch=1, image_size=64)
    with torch.no_grad():
        noisy.train()
        train_a, train_b = noisy(video, audio), noisy(video, audio)
        assert (train_a["offset_logits"] - train_b["offset_logits"]).abs().max() > 1e-4
        noisy.eval(), clean.eval()
        torch.testing.assert_close(noisy(video, audio), clean(video, audio), rtol=0, atol=0)


def test_ast_position_embedding_follows_time_frames():
    ast = AudioSpectrogramTransformer(time_frames=26, dim=32, depth=1, num_heads=2).eval()
    assert ast.grid == (12, 2)
    assert ast.pos_embed.shape == (1, 2 + 12 * 2, 32)
    with torch.no_grad():
        assert ast(torch.randn(2, 3, 1, 128, 26)).shape == (2, 3, 2, 32)
    with pytest.raises(ValueError, match=r"\(1, F, Ta\) = \(1, 128, 26\)"):
        ast(torch.randn(2, 3, 1, 128, 66))


def test_motionformer_sizes_follow_image_size_and_frames():
    tower = Motionformer(image_size=64, num_frames=6, dim=32, depth=1, num_heads=2).eval()
    assert tower.pos_embed.shape == (1, 1 + 16, 32)
    assert tower.temp_embed.shape == (1, 3, 32)
    with torch.no_grad():
        assert tower(torch.randn(2, 2, 6, 3, 64, 64)).shape == (2, 2, 3, 32)
    with pytest.raises(ValueError, match=r"\(T, C, H, W\) = \(6, 3, 64, 64\)"):
        tower(torch.randn(2, 2, 3, 6, 64, 64))


def test_sync_module_rejects_wrong_number_of_tokens():
    sync = SyncTransformer(num_visual_tokens=4, num_audio_tokens=12, dim=32, depth=1, num_heads=4)
    with pytest.raises(ValueError, match="check the number of segments"):
        sync(torch.randn(1, 6, 32), torch.randn(1, 12, 32))


def test_init_like_timm_and_official_sync_tokens():
    torch.manual_seed(0)
    net = tiny_net()
    assert torch.equal(net.audio.norm.weight, torch.ones(48))
    assert torch.equal(net.audio.blocks[0].attn.qkv.bias, torch.zeros(3 * 48))
    assert net.visual.blocks[0].mlp.fc1.weight.std().item() == pytest.approx(0.02 * 0.88, rel=0.05)
    assert net.visual.pos_embed.abs().max() <= 0.04
    assert net.sync.pos_embed.std().item() == pytest.approx(1.0, rel=0.1)


def test_pooled_segment_embeddings_are_unit_mean_directions():
    features = torch.randn(2, 3, 8, 16)
    pooled = pooled_segment_embeddings(features)
    assert pooled.shape == (2, 3, 16)
    torch.testing.assert_close(pooled.norm(dim=-1), torch.ones(2, 3))
    mean = features.mean(dim=2)
    torch.testing.assert_close(pooled * mean.norm(dim=-1, keepdim=True), mean)


# ---------------------------------------------------------------- importer


def test_filter_fuses_qkv_in_query_key_value_order():
    q, k, v = torch.full((4, 4), 1.0), torch.full((4, 4), 2.0), torch.full((4, 4), 3.0)
    prefix = "transformer.blocks.0.attn."
    ours = checkpoint_filter_fn(
        {prefix + "key.weight": k, prefix + "value.weight": v, prefix + "query.weight": q}
    )
    assert list(ours) == ["sync.blocks.0.attn.qkv.weight"]
    torch.testing.assert_close(ours["sync.blocks.0.attn.qkv.weight"], torch.cat((q, k, v)))
    with pytest.raises(ValueError, match=r"lacks the \['value'\] projection"):
        checkpoint_filter_fn({prefix + "key.weight": k, prefix + "query.weight": q})


def test_filter_rejects_unknown_keys_and_drops_unused_patch_embed():
    assert checkpoint_filter_fn({"vfeat_extractor.patch_embed.proj.weight": torch.zeros(1)}) == {}
    with pytest.raises(ValueError, match=r"unrecognised key 'vfeat_extractor.temp_attn_agg.x'"):
        checkpoint_filter_fn({"vfeat_extractor.temp_attn_agg.x": torch.zeros(1)})
    with pytest.raises(ValueError, match="two official keys map to 'vproj.weight'"):
        checkpoint_filter_fn({"vproj.weight": torch.ones(1), "module.vproj.weight": torch.ones(1)})


def test_fit_sync_positions_trims_and_refuses_to_grow():
    state = {"sync.pos_embed": torch.arange(18.0).reshape(1, 18, 1)}
    trimmed = fit_sync_positions(state, 10)["sync.pos_embed"]
    assert torch.equal(trimmed, torch.arange(10.0).reshape(1, 10, 1))
    with pytest.raises(ValueError, match="fewer than the 20 tokens"):
        fit_sync_positions({"sync.pos_embed": torch.zeros(1, 18, 1)}, 20)


def save_official_like(path, **entries):
    torch.save(entries, path)
    return path


def test_loader_reads_stage2_file_with_config_metrics_and_optimizer(tmp_path):
    n_embd = "${model.params.transformer.params.n_embd}"
    args = OmegaConf.create({
        "model": {"params": {
            "transformer": {"params": {"n_embd": 32}},
            "vproj": {"params": {"out_features": n_embd}},
        }},
        "data": {"n_segments": 14, "vids_path": "/data/vgg", "grid": [-2.0, 0.0, 2.0], "x": None},
    })
    model = {
        "vfeat_extractor.cls_token": torch.ones(1, 1, 4),
        "afeat_extractor.ast.embeddings.distillation_token": torch.full((1, 1, 4), 2.0),
        "transformer.blocks.0.attn.query.bias": torch.zeros(4),
        "transformer.blocks.0.attn.key.bias": torch.ones(4),
        "transformer.blocks.0.attn.value.bias": torch.full((4,), 2.0),
        "transformer.off_head.weight": torch.zeros(21, 4),
    }
    path = save_official_like(
        tmp_path / "sync.pt", model=model, args=args, epoch=7, model_type="Synchformer",
        metrics={"accuracy_1": np.float64(0.43), "n": np.int64(3)}, loss=torch.tensor(1.5),
        optimizer={
            "state": {0: {"step": torch.tensor(3.0)}},
            "param_groups": [{"lr": 1e-5, "betas": (0.9, 0.999)}],
        },
    )
    checkpoint = load_official_checkpoint(path)
    assert checkpoint.layout == SYNC
    qkv = "sync.blocks.0.attn.qkv.bias"
    assert set(checkpoint.state_dict) == {
        "visual.cls_token", "audio.dist_token", qkv, "sync.offset_head.weight",
    }
    expected_qkv = torch.tensor([0.0] * 4 + [1.0] * 4 + [2.0] * 4)  # query, key, value
    torch.testing.assert_close(checkpoint.state_dict[qkv], expected_qkv)
    assert checkpoint.config["model"]["params"]["vproj"]["params"]["out_features"] == 32
    assert checkpoint.config["data"]["grid"] == [-2.0, 0.0, 2.0]

    model["transformer.sync_head.weight"] = model.pop("transformer.off_head.weight")[:2]
    path = save_official_like(tmp_path / "synchability.pt", model=model, args=args)
    assert load_official_checkpoint(path).layout == SYNCHRONIZABILITY


def test_loader_reads_stage1_file(tmp_path):
    weights = {
        "module.v_encoder.blocks.0.norm3.weight": torch.ones(4),
        "module.a_encoder.freq_attn_agg.self_attn.in_proj_weight": torch.zeros(12, 4),
        "module.logit_scale": torch.tensor(0.07),
    }
    path = save_official_like(tmp_path / "epoch_1.pt", state_dict=weights, epoch=1, name="run")
    checkpoint = load_official_checkpoint(path)
    assert checkpoint.layout == STAGE1
    assert set(checkpoint.state_dict) == {
        "visual.blocks.0.time_norm.weight", "audio.freq_agg.block.attn.qkv.weight", "temperature",
    }
    assert checkpoint.state_dict["temperature"].item() == pytest.approx(0.07)
    assert checkpoint.config is None


def test_loader_refuses_unknown_layout(tmp_path):
    path = save_official_like(tmp_path / "other.pt", weights={"encoder.w": torch.zeros(2)})
    expected = r"other.pt: unrecognised checkpoint layout \(top level: \['weights'\]\)"
    with pytest.raises(ValueError, match=expected):
        load_official_checkpoint(path)
    path = save_official_like(
        tmp_path / "towers_only.pt", model={"vfeat_extractor.cls_token": torch.zeros(1)}
    )
    with pytest.raises(ValueError, match="unrecognised checkpoint layout"):
        load_official_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="no official Synchformer checkpoint"):
        load_official_checkpoint(tmp_path / "missing.pt")


class CreatesAFileWhenUnpickled:
    """A pickle payload: unpickling calls ``open(target, "w")``."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return open, (self.target, "w")


def test_loader_refuses_malicious_pickle_without_running_it(tmp_path):
    target = tmp_path / "pwned.txt"
    path = save_official_like(
        tmp_path / "evil.pt", model={"vfeat_extractor.cls_token": torch.zeros(1)},
        args=CreatesAFileWhenUnpickled(target),
    )
    refused = r"evil.pt: refused to load: the file pickles \['io.open'\]"
    with pytest.raises(ValueError, match=refused):
        load_official_checkpoint(path)
    assert not target.exists()
    # the payload is real: an unrestricted unpickler would have created the file
    witness = tmp_path / "witness.txt"
    pickle.loads(pickle.dumps(CreatesAFileWhenUnpickled(witness))).close()
    assert witness.exists()
