"""Exact resume and crash-safe checkpoint files.

1. A real training killed with SIGKILL mid-epoch, after a checkpoint written by
   ``checkpoint.save_interval_updates``, and restarted with the same command (fairseq resumes
   from checkpoint_last.pt) ends with the same parameters, optimizer state and logged metrics
   as an uninterrupted run, across the following epoch boundary too. What makes it exact:
   fairseq reseeds torch with ``seed + num_updates`` before every update (dropout, drop-path,
   masks), restores the epoch's position, the meters and the optimizer/scheduler, our
   datasets seed every item by (seed, epoch, index), and the AV-data2vec teacher saves the
   update it was last stepped at (so the first update after resuming steps it as usual).
2. A checkpoint write killed half-way leaves the previous checkpoint_last.pt intact: fairseq
   writes the first file of a save to ``.tmp`` and renames it, but copies it in place to the
   others (checkpoint_last.pt), which our fix makes atomic too. Shown with fairseq's real
   ``save_checkpoint`` in a process that kills itself in the middle of the write.
"""
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from test_distributed import (
    AV_DATA2VEC_RECIPE, ENV, REPO, SYNCHFORMER_RECIPE, SYNCHFORMER_TEST_OVERRIDES, log_records,
    make_speech_corpus, run_to_end, start, train_command,
)

AV_DATA2VEC_PRETRAIN_RECIPE = AV_DATA2VEC_RECIPE.parents[1] / "pretrain" / "tiny_synthetic.yaml"
# 6 training clips, batch 1: 6 updates per epoch; checkpoints at 2 and 4 (mid-epoch), 6, 8
RESUME_OVERRIDES = [
    "dataset.batch_size=1", "optimization.max_update=8", "checkpoint.save_interval_updates=2",
    "checkpoint.keep_interval_updates=1", "dataset.disable_validation=true",
]
RECIPES = {
    # drop-path on: the resumed run must also redraw the same random numbers
    "synchformer": (SYNCHFORMER_RECIPE, [*SYNCHFORMER_TEST_OVERRIDES, "++model.video_drop_path=0.1"]),
    "av_data2vec": (AV_DATA2VEC_PRETRAIN_RECIPE, ["dataset.max_tokens=null"]),
}
MID_EPOCH_SAVE = re.compile(r"Saved checkpoint \S+ \(epoch 1 @ [24] updates")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_speech_corpus(tmp_path_factory.mktemp("resume") / "speech")


def kill_after_mid_epoch_checkpoint(process: subprocess.Popen, log_path, timeout_s: float = 600) -> None:
    """SIGKILL ``process`` as soon as its log reports a mid-epoch checkpoint."""
    deadline = time.monotonic() + timeout_s
    while not MID_EPOCH_SAVE.search(log_path.read_text()):
        assert process.poll() is None, f"training ended before a mid-epoch checkpoint:\n{log_path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no mid-epoch checkpoint in time"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL


def state(path):
    from avplugins.checkpoint import load_checkpoint_state

    return load_checkpoint_state(str(path))


@pytest.mark.parametrize("recipe_name", ["synchformer", "av_data2vec"])
def test_killed_and_resumed_run_equals_uninterrupted_run(corpus, tmp_path, recipe_name):
    recipe, overrides = RECIPES[recipe_name]
    if not recipe.is_file():
        pytest.skip(f"{recipe} not written yet")
    overrides = [f"task.data={corpus}", *overrides, *RESUME_OVERRIDES]
    uninterrupted = start(train_command(recipe, tmp_path / "whole", overrides), tmp_path / "whole.log")
    interrupted = start(train_command(recipe, tmp_path / "resumed", overrides), tmp_path / "killed.log")
    kill_after_mid_epoch_checkpoint(interrupted, tmp_path / "killed.log")

    saved = state(tmp_path / "resumed" / "checkpoint_last.pt")["extra_state"]["train_iterator"]
    assert saved["epoch"] == 1 and saved["iterations_in_epoch"] in (2, 4)  # mid-epoch
    resumed_log = run_to_end(train_command(recipe, tmp_path / "resumed", overrides), tmp_path / "resumed.log")
    assert f"Loaded checkpoint {tmp_path / 'resumed' / 'checkpoint_last.pt'}" in resumed_log
    assert uninterrupted.wait(timeout=900) == 0, (tmp_path / "whole.log").read_text()[-3000:]
    whole_log = (tmp_path / "whole.log").read_text()

    whole_updates, resumed_updates = log_records(whole_log), log_records(resumed_log)
    assert len(whole_updates) == 8 and len(resumed_updates) == 8 - saved["iterations_in_epoch"]
    assert resumed_updates == whole_updates[-len(resumed_updates):]  # every printed digit
    # epoch summaries: epoch 1 averages meters restored from the checkpoint with new updates
    assert log_records(resumed_log, "train") == log_records(whole_log, "train")

    whole = state(tmp_path / "whole" / "checkpoint_last.pt")
    resumed = state(tmp_path / "resumed" / "checkpoint_last.pt")
    assert whole["model"].keys() == resumed["model"].keys()
    for key, value in whole["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    torch.testing.assert_close(resumed["last_optimizer_state"], whole["last_optimizer_state"], rtol=0, atol=0)


# A process writes checkpoints the way fairseq's trainer does: updates 2, then 4 (each an
# update checkpoint plus checkpoint_last.pt), and SIGKILLs itself half-way through writing
# CRASH_IN ("save": the first file; "copy": checkpoint_last.pt).
SAVE_SCRIPT = r"""
import io, os, shutil, signal, sys
import torch
from fairseq import checkpoint_utils
from fairseq.dataclass.configs import CheckpointConfig

save_dir, crash_in, apply_fixes = sys.argv[1], sys.argv[2], sys.argv[3] == "fixed"
if apply_fixes:
    from avplugins.distributed import apply_fairseq_fixes
    apply_fairseq_fixes()


class Trainer:
    data_parallel_rank = 0
    should_save_checkpoint_on_current_rank = True
    checkpoint_suffix = ""
    task = None

    def __init__(self, num_updates):
        self.num_updates = num_updates

    def consolidate_optimizer(self):
        pass

    def get_num_updates(self):
        return self.num_updates

    def save_checkpoint(self, filename, extra_state):
        state = {"model": {"weight": torch.full((256, 1024), float(self.num_updates))},
                 "extra_state": extra_state}
        checkpoint_utils.torch_persistent_save(state, filename)


class EpochIterator:
    epoch = 1

    def __init__(self, position):
        self.position = position

    def end_of_epoch(self):
        return False

    def state_dict(self):
        return {"version": 2, "epoch": 1, "iterations_in_epoch": self.position, "shuffle": True}


def first_half(write_all):
    buffer = io.BytesIO()
    write_all(buffer)
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


real_save, real_copyfile = torch.save, shutil.copyfile


def crashing_save(obj, f):
    f.write(first_half(lambda buffer: real_save(obj, buffer)))
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def crashing_copyfile(src, dst, **kwargs):
    with open(src, "rb") as source, open(dst, "wb") as target:
        target.write(first_half(lambda buffer: buffer.write(source.read())))
    os.kill(os.getpid(), signal.SIGKILL)


cfg = CheckpointConfig(save_dir=save_dir, save_interval_updates=2, keep_interval_updates=-1)
checkpoint_utils.save_checkpoint(cfg, Trainer(2), EpochIterator(2), None)
if crash_in == "save":
    torch.save = crashing_save
else:
    shutil.copyfile = crashing_copyfile
checkpoint_utils.save_checkpoint(cfg, Trainer(4), EpochIterator(4), None)
"""


def crash_while_saving(save_dir, crash_in: str, fixes: str):
    result = subprocess.run([sys.executable, "-c", SAVE_SCRIPT, str(save_dir), crash_in, fixes],
                            capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]


@pytest.mark.parametrize("crash_in", ["save", "copy"])
def test_write_killed_half_way_leaves_previous_checkpoint_last(tmp_path, crash_in):
    crash_while_saving(tmp_path, crash_in, "fixed")
    last = state(tmp_path / "checkpoint_last.pt")
    assert last["extra_state"]["train_iterator"]["iterations_in_epoch"] == 2
    assert torch.equal(last["model"]["weight"], torch.full((256, 1024), 2.0))


def test_fairseq_alone_leaves_a_truncated_checkpoint_last_when_killed_while_copying(tmp_path):
    """Why the fix exists: without it the same crash corrupts checkpoint_last.pt."""
    crash_while_saving(tmp_path, "copy", "unfixed")
    with pytest.raises(RuntimeError, match="PytorchStreamReader failed|failed finding central directory"):
        torch.load(tmp_path / "checkpoint_last.pt", weights_only=True)
