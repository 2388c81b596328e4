"""Untrusted checkpoints: a real checkpoint from training loads; a tampered one whose pickle
would run code (here: create a marker file) is refused and nothing of it runs, through
``avplugins.load_model``, through fairseq's loader and through ``avplugins-train``'s resume; an
unreadable one (cut short, empty, not a torch file) is named with its cause.

fairseq's ``load_checkpoint_to_cpu`` calls ``torch.load`` without ``weights_only``; torch 2.13
defaults to ``weights_only=True``, so fairseq alone already refuses the payload (checked
below). With ``import avplugins`` (every fairseq command with our user dir) it additionally
loads under our allow-list and names the refusal ``UnsafeCheckpointError``. (Setting
TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 would turn fairseq's default off; ``avplugins.load_model``
passes ``weights_only=True`` explicitly and stays safe.)
"""
import pickle
import subprocess

import pytest
import torch
from fairseq import checkpoint_utils

import avplugins
from avplugins.checkpoint import CorruptCheckpointError, UnsafeCheckpointError, load_checkpoint_state
from test_distributed import (
    ENV, REPO, SYNCHFORMER_RECIPE, SYNCHFORMER_TEST_OVERRIDES, make_speech_corpus, run_to_end, train_command,
)

TRAIN_ONE_UPDATE = [*SYNCHFORMER_TEST_OVERRIDES, "dataset.batch_size=1", "optimization.max_update=1",
                    "dataset.disable_validation=true"]


class CreatesMarkerWhenUnpickled:
    """Pickles as a call of ``open(marker, "w")``: unpickling it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(corpus, checkpoint of a real one-update Synchformer training)."""
    root = tmp_path_factory.mktemp("safety")
    corpus = make_speech_corpus(root / "speech", num_clips=3, duration_s=3.0)
    run_to_end(train_command(SYNCHFORMER_RECIPE, root / "run", [f"task.data={corpus}", *TRAIN_ONE_UPDATE]),
               root / "train.log")
    return corpus, root / "run" / "checkpoint_last.pt"


def tampered_copy(checkpoint, path, marker):
    """``checkpoint`` with a code-running object added to its extra state, saved at ``path``."""
    state = load_checkpoint_state(str(checkpoint))
    state["extra_state"]["note"] = CreatesMarkerWhenUnpickled(marker)
    torch.save(state, path)
    return path


def test_real_training_checkpoint_loads(trained):
    _, checkpoint = trained
    model = avplugins.load_model(str(checkpoint))
    assert type(model).__name__.startswith("SynchformerSegmentClipModel") and not model.training
    saved = load_checkpoint_state(str(checkpoint))["model"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved[name]), name
    assert checkpoint_utils.load_checkpoint_to_cpu(str(checkpoint))["cfg"].task._name == "av_sync_pretraining"


def test_payload_runs_when_unpickled_without_protection(trained, tmp_path):
    """The test's payload is live: a plain unpickler creates the marker."""
    marker = tmp_path / "marker"
    evil = tampered_copy(trained[1], tmp_path / "evil.pt", marker)
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_load_model_refuses_code_running_checkpoint(trained, tmp_path):
    marker = tmp_path / "marker"
    evil = tampered_copy(trained[1], tmp_path / "evil.pt", marker)
    for load in (avplugins.load_model, load_checkpoint_state):
        with pytest.raises(UnsafeCheckpointError, match=rf"{evil}: refused to load: .*allow-list"):
            load(str(evil))
    assert not marker.exists()


def test_fairseq_loader_is_protected_by_torch_default(trained, tmp_path):
    marker = tmp_path / "marker"
    evil = tampered_copy(trained[1], tmp_path / "evil.pt", marker)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(evil, map_location="cpu")  # fairseq's call: no weights_only argument
    # fairseq's function itself (patched or not by avplugins-train in this process)
    with pytest.raises((pickle.UnpicklingError, UnsafeCheckpointError)):
        checkpoint_utils.load_checkpoint_to_cpu(str(evil))
    assert not marker.exists()


def test_avplugins_train_refuses_to_resume_from_code_running_checkpoint(trained, tmp_path):
    corpus, checkpoint = trained
    marker = tmp_path / "marker"
    (tmp_path / "run").mkdir()
    tampered_copy(checkpoint, tmp_path / "run" / "checkpoint_last.pt", marker)
    result = subprocess.run(
        train_command(SYNCHFORMER_RECIPE, tmp_path / "run", [f"task.data={corpus}", *TRAIN_ONE_UPDATE]),
        capture_output=True, text=True, env=ENV, cwd=REPO, timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "UnsafeCheckpointError" in output and "checkpoint_last.pt: refused to load" in output, output[-3000:]
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["cut short", "empty", "not a torch file"])
def test_unreadable_checkpoint_is_named_with_its_cause(trained, tmp_path, damage):
    data = open(trained[1], "rb").read()
    broken = tmp_path / "checkpoint_last.pt"
    broken.write_bytes({"cut short": data[: len(data) // 2], "empty": b"", "not a torch file": b"garbage\n"}[damage])
    for load in (load_checkpoint_state, checkpoint_utils.load_checkpoint_to_cpu):  # the latter as patched
        with pytest.raises(CorruptCheckpointError, match=rf"{broken}: not a readable checkpoint: .*cut short"):
            load(str(broken))
