"""Numerical parity with the official Synchformer code: the tiny-configuration fixtures
(../shared/fixtures/README.md) hold official-format weights, inputs and the official outputs;
our modules load the remapped weights strictly and must reproduce every output."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from avplugins.convert.synchformer import (
    SYNC,
    SYNCHRONIZABILITY,
    checkpoint_filter_fn,
    load_official_checkpoint,
)
from avplugins.modules.synchformer_net import SynchformerNet

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURE = REPO_ROOT.parent / "shared" / "fixtures" / "synchformer_official_tiny.pt"
TOLERANCE = dict(rtol=1e-5, atol=1e-5)
LOGITS_KEY = {SYNC: "offset_logits", SYNCHRONIZABILITY: "sync_logits"}


@pytest.fixture(scope="module")
def fixture():
    if not FIXTURE.is_file():
        pytest.skip(f"official Synchformer fixture not found at {FIXTURE}")
    return torch.load(FIXTURE, weights_only=True)


def build_tiny(meta, variant):
    """Our net configured from the fixture's recorded tiny configuration."""
    config = meta["tiny_config"]
    vit = config["motionformer_vit_overrides"]
    ast = config["ast_config_overrides"]
    sync = config["sync_transformer"]
    return SynchformerNet.build(
        num_segments=config["S"],
        visual_args=dict(
            image_size=config["H"], num_frames=config["T_frames"], dim=vit["VIT.EMBED_DIM"],
            depth=vit["VIT.DEPTH"], num_heads=vit["VIT.NUM_HEADS"],
        ),
        audio_args=dict(
            num_mel_bins=config["mel_bins_F"], time_frames=config["spec_frames_Ta"],
            dim=ast["hidden_size"], depth=ast["num_hidden_layers"],
            num_heads=ast["num_attention_heads"],
            mlp_ratio=ast["intermediate_size"] / ast["hidden_size"],
        ),
        sync_args=dict(
            dim=sync["n_embd"], depth=sync["n_layer"], num_heads=sync["n_head"],
            num_offset_classes=21 if variant == SYNC else 0, sync_head=variant == SYNCHRONIZABILITY,
        ),
    )


def run(net, inputs):
    """Official-style inference: eval, float32, no grad -> the four compared outputs."""
    net.eval()
    with torch.no_grad():
        vfeats, afeats = net.forward_features(inputs["vis"], inputs["aud"])
        tokens = net.sync_tokens(vfeats, afeats)
        logits = net.sync.heads(tokens)
    return {"vfeats": vfeats, "afeats": afeats, "ln_f_out": tokens, "logits": logits}


@pytest.mark.parametrize("variant", [SYNC, SYNCHRONIZABILITY])
def test_outputs_match_official_code(fixture, variant):
    official = fixture["variants"][variant]
    net = build_tiny(fixture["meta"], variant)
    net.load_state_dict(checkpoint_filter_fn(official["state_dict"]), strict=True)
    out = run(net, fixture["inputs"])
    assert set(out["logits"]) == {LOGITS_KEY[variant]}
    out["logits"] = out["logits"][LOGITS_KEY[variant]]
    for name, expected in official["expected"].items():
        assert out[name].shape == expected.shape, name
        torch.testing.assert_close(out[name], expected, **TOLERANCE, msg=lambda m: f"{name}: {m}")


def test_segment_order_matters_at_this_tolerance(fixture):
    """The comparison has teeth: swapping the two segments of the input moves the per-segment
    features far beyond the tolerance (a token-ordering bug cannot hide in them)."""
    official = fixture["variants"][SYNC]
    net = build_tiny(fixture["meta"], SYNC)
    net.load_state_dict(checkpoint_filter_fn(official["state_dict"]), strict=True)
    inputs = {name: x.flip(1) for name, x in fixture["inputs"].items()}
    out = run(net, inputs)
    assert (out["vfeats"] - official["expected"]["vfeats"]).abs().max() > 100 * TOLERANCE["atol"]
    assert (out["afeats"] - official["expected"]["afeats"]).abs().max() > 100 * TOLERANCE["atol"]


@pytest.mark.parametrize("variant", [SYNC, SYNCHRONIZABILITY])
def test_safe_loader_reads_official_layout_file(fixture, variant, tmp_path):
    """The same weights saved as the official trainer does (with a pickled OmegaConf ``args``)
    go through the safe loader and still reproduce the official logits."""
    official = fixture["variants"][variant]
    path = tmp_path / f"{variant}.pt"
    args = OmegaConf.create({"model": official["model_config_resolved"]})
    torch.save({"model": official["state_dict"], "args": args, "epoch": 1}, path)
    checkpoint = load_official_checkpoint(path)
    assert checkpoint.layout == variant
    assert checkpoint.config["model"]["params"]["transformer"]["params"]["n_embd"] == 32
    net = build_tiny(fixture["meta"], variant)
    net.load_state_dict(checkpoint.state_dict, strict=True)
    logits = run(net, fixture["inputs"])["logits"][LOGITS_KEY[variant]]
    torch.testing.assert_close(logits, official["expected"]["logits"], **TOLERANCE)
