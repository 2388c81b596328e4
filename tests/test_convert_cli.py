"""``avplugins-convert synchformer``: official-layout files made from the official-code fixture
(../shared/fixtures/README.md) are converted, loaded the ways users load them
(``avplugins.load_model``, fairseq's ``load_model_ensemble_and_task`` as ``fairseq-validate``)
and must reproduce the official outputs."""
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import avplugins
from avplugins.convert.cli import main
from avplugins.models.synchformer import SynchformerModel
from avplugins.models.synchformer_segment_clip import SynchformerSegmentClipModel

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURE = REPO_ROOT.parent / "shared" / "fixtures" / "synchformer_official_tiny.pt"
TOLERANCE = dict(rtol=1e-5, atol=1e-5)
LOGITS_KEY = {"sync": "offset_logits", "synchability": "sync_logits"}
TINY_HEADS = ["--video-heads", "4", "--audio-heads", "4"]  # the fixture's towers (README table)


@pytest.fixture(scope="module")
def fixture():
    if not FIXTURE.is_file():
        pytest.skip(f"official Synchformer fixture not found at {FIXTURE}")
    return torch.load(FIXTURE, weights_only=True)


def write_official_stage2(fixture, variant, path, data=None):
    """The fixture's weights saved as the official trainer saves them (pickled OmegaConf args)."""
    official = fixture["variants"][variant]
    config = {"model": official["model_config_resolved"], **({"data": data} if data else {})}
    torch.save({"model": official["state_dict"], "args": OmegaConf.create(config), "epoch": 3}, path)
    return path


def write_official_stage1(fixture, path):
    """A stage-1 (AVCLIP) file under DDP's ``module.`` prefix: the fixture's video tower as
    ``v_encoder``, and as ``a_encoder`` its audio tower's keys widened from 48 to the video's 64
    (stage 1 compares the towers' embeddings, so their widths must match) with seeded values."""
    generator = torch.Generator().manual_seed(0)
    widened = {48: 64, 144: 192, 192: 256}  # width, q/k/v, MLP hidden
    weights = {}
    for key, value in fixture["variants"]["sync"]["state_dict"].items():
        if key.startswith("vfeat_extractor."):
            weights["module.v_encoder." + key[len("vfeat_extractor."):]] = value
        elif key.startswith("afeat_extractor."):
            shape = [widened.get(size, size) for size in value.shape]
            value = 0.02 * torch.randn(shape, generator=generator)
            weights["module.a_encoder." + key[len("afeat_extractor."):]] = value
    weights["module.logit_scale"] = torch.tensor(0.05)
    torch.save({"state_dict": weights, "epoch": 1, "name": "run"}, path)
    return weights


def convert(official, out, *extra):
    return main(["synchformer", str(official), str(out), *TINY_HEADS, *extra])


@pytest.mark.parametrize("variant", ["sync", "synchability"])
def test_stage2_conversion_reproduces_official_logits(fixture, variant, tmp_path, capsys):
    official = write_official_stage2(fixture, variant, tmp_path / "official.pt")
    out = tmp_path / "ours.pt"
    assert convert(official, out) == 0
    assert f"official {variant} checkpoint" in capsys.readouterr().out

    saved = torch.load(out, weights_only=True)  # plain containers and tensors only
    assert saved["args"] is None
    model_cfg, task_cfg = saved["cfg"]["model"], saved["cfg"]["task"]
    assert (model_cfg["_name"], task_cfg["_name"], saved["cfg"]["criterion"]["_name"]) == (
        "synchformer", "av_sync", "av_sync_offset"
    )
    # sizes read from the weights: 2 segments of 4 frames, 224 crop, towers 64 / 48, sync 32 x 2
    assert (task_cfg["num_segments"], task_cfg["segment_frames"], task_cfg["segment_stride_frames"]) == (2, 4, 2)
    assert (task_cfg["crop_size"], task_cfg["resize_short_side"]) == (224, 256)
    assert (model_cfg["video_dim"], model_cfg["video_depth"], model_cfg["audio_dim"]) == (64, 2, 48)
    assert (model_cfg["sync_dim"], model_cfg["sync_depth"], model_cfg["sync_heads"]) == (32, 2, 4)
    assert model_cfg["offset_head"] == (variant == "sync")
    assert model_cfg["sync_head"] == task_cfg["synchronizability"] == (variant == "synchability")

    expected = fixture["variants"][variant]["expected"]["logits"]
    inputs = fixture["inputs"]
    model = avplugins.load_model(str(out))
    assert isinstance(model, SynchformerModel) and not model.training
    with torch.no_grad():
        logits = model(video=inputs["vis"], audio=inputs["aud"])
    assert set(logits) == {LOGITS_KEY[variant]}
    torch.testing.assert_close(logits[LOGITS_KEY[variant]], expected, **TOLERANCE)

    # what fairseq-validate / fairseq-generate call
    from fairseq import checkpoint_utils

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(out)])
    assert cfg.task._name == "av_sync" and type(task).__name__ == "AVSyncTask"
    models[0].eval()
    with torch.no_grad():
        again = models[0](video=inputs["vis"], audio=inputs["aud"])[LOGITS_KEY[variant]]
    torch.testing.assert_close(again, expected, **TOLERANCE)


def test_stage1_conversion_keeps_the_official_towers(fixture, tmp_path):
    official = tmp_path / "epoch_1.pt"
    weights = write_official_stage1(fixture, official)
    out = tmp_path / "stage1.pt"
    assert convert(official, out) == 0
    cfg = torch.load(out, weights_only=True)["cfg"]
    assert (cfg["model"]["_name"], cfg["task"]["_name"]) == ("synchformer_segment_clip", "av_sync_pretraining")
    assert (cfg["model"]["video_dim"], cfg["model"]["audio_dim"]) == (64, 64)
    assert cfg["task"]["segment_stride_frames"] == cfg["task"]["segment_frames"] == 4  # no overlap
    model = avplugins.load_model(str(out))
    assert isinstance(model, SynchformerSegmentClipModel)
    assert model.temperature.item() == pytest.approx(0.05)
    with torch.no_grad():
        vfeats, _ = model.net.forward_features(fixture["inputs"]["vis"], fixture["inputs"]["aud"])
    torch.testing.assert_close(vfeats, fixture["variants"]["sync"]["expected"]["vfeats"], **TOLERANCE)
    layer = "module.a_encoder.ast.encoder.layer.1.attention.attention."
    official_qkv = torch.cat([weights[layer + f"{part}.weight"] for part in ("query", "key", "value")])
    torch.testing.assert_close(model.net.audio.blocks[1].attn.qkv.weight, official_qkv, rtol=0, atol=0)


def test_stage1_towers_of_different_widths_are_refused(fixture, tmp_path, capsys):
    """Stage 1 compares the towers' embeddings: the fixture's 64 / 48 towers cannot be one."""
    renamed = {"vfeat_extractor.": "module.v_encoder.", "afeat_extractor.": "module.a_encoder."}
    weights = {
        renamed[key[: key.index(".") + 1]] + key[key.index(".") + 1:]: value
        for key, value in fixture["variants"]["sync"]["state_dict"].items()
        if key[: key.index(".") + 1] in renamed
    }
    torch.save({"state_dict": {**weights, "module.logit_scale": torch.tensor(0.07)}}, tmp_path / "s1.pt")
    assert convert(tmp_path / "s1.pt", tmp_path / "out.pt") == 2
    assert "s1.pt: model.video_dim=64 and model.audio_dim=48 must be equal" in capsys.readouterr().err


def test_recorded_segments_trim_the_sync_positions(fixture, tmp_path):
    """A config recording fewer segments than the positions hold (the official synchronizability
    model: 13 segments from a 14-segment start) trims the position embedding."""
    official = write_official_stage2(
        fixture, "synchability", tmp_path / "official.pt", data={"n_segments": 1, "vfps": 25, "max_off_sec": 2}
    )
    out = tmp_path / "ours.pt"
    assert convert(official, out) == 0
    saved = torch.load(out, weights_only=True)
    assert saved["cfg"]["task"]["num_segments"] == 1
    full = fixture["variants"]["synchability"]["state_dict"]["transformer.pos_emb_cfg.pos_emb"]
    torch.testing.assert_close(saved["model"]["net.sync.pos_embed"], full[:, : 2 + 1 * (2 + 6)])
    model = avplugins.load_model(str(out))
    inputs = {name: x[:, :1] for name, x in fixture["inputs"].items()}
    assert model(**{"video": inputs["vis"], "audio": inputs["aud"]})["sync_logits"].shape == (2, 2)


def test_unknown_head_count_asks_for_the_option(fixture, tmp_path, capsys):
    official = write_official_stage2(fixture, "sync", tmp_path / "official.pt")
    assert main(["synchformer", str(official), str(tmp_path / "ours.pt")]) == 2
    assert "cannot tell the number of attention heads of the video transformer" in capsys.readouterr().err
    assert main(["synchformer", str(official), str(tmp_path / "ours.pt"), "--video-heads", "5",
                 "--audio-heads", "4"]) == 2
    assert "video width 64 is not divisible by 5 heads" in capsys.readouterr().err
    assert not (tmp_path / "ours.pt").exists()


class CreatesAFileWhenUnpickled:
    """A pickle payload: unpickling calls ``open(target, "w")``."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return open, (self.target, "w")


def test_malicious_and_foreign_files_are_refused(tmp_path, capsys):
    witness = tmp_path / "pwned.txt"
    evil = tmp_path / "evil.pt"
    payload = {"model": {"vfeat_extractor.cls_token": torch.zeros(1)}, "args": CreatesAFileWhenUnpickled(witness)}
    torch.save(payload, evil)
    out = tmp_path / "out.pt"
    assert main(["synchformer", str(evil), str(out)]) == 2
    error = capsys.readouterr().err
    assert "evil.pt: refused to load" in error and "io.open" in error
    assert not witness.exists() and not out.exists()

    foreign = tmp_path / "wav2vec.pt"
    torch.save({"model": {"encoder.layers.0.weight": torch.zeros(2)}, "cfg": {}}, foreign)
    assert main(["synchformer", str(foreign), str(out)]) == 2
    assert "wav2vec.pt: unrecognised checkpoint layout" in capsys.readouterr().err

    assert main(["synchformer", str(tmp_path / "missing.pt"), str(out)]) == 2
    assert "no official Synchformer checkpoint at" in capsys.readouterr().err
    assert not out.exists()


def test_writing_is_atomic(fixture, tmp_path, capsys):
    """A failed conversion leaves an existing output untouched; a successful one replaces it
    and leaves no temporary file behind."""
    out = tmp_path / "ours.pt"
    out.write_bytes(b"previous")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": {}}, foreign)
    assert main(["synchformer", str(foreign), str(out)]) == 2
    assert out.read_bytes() == b"previous"
    assert convert(write_official_stage2(fixture, "sync", tmp_path / "official.pt"), out) == 0
    assert "model" in torch.load(out, weights_only=True)
    assert sorted(os.listdir(tmp_path)) == ["foreign.pt", "official.pt", "ours.pt"]
    capsys.readouterr()
    assert convert(tmp_path / "official.pt", tmp_path / "no_such_folder" / "ours.pt") == 2
    assert "the folder" in capsys.readouterr().err
