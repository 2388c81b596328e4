"""Data-parallel training on CPUs through ``avplugins-train`` (avplugins/distributed.py).

End to end, with real trainings on a tiny synthetic corpus: 2 CPU workers with batch B end
with the same parameters as 1 process with batch 2B, for Synchformer stage 1 (workers spawned
by the launcher, InfoNCE negatives gathered across workers) and an AV-data2vec recogniser
(workers started by ``torchrun``, env:// rendezvous). The corpus has exactly 2B training clips,
so every epoch is one update in which both set-ups see the same clips, and every random choice
of an item is seeded by (seed, epoch, index). The comparison trains with plain SGD: Adam divides
each step by the gradient's magnitude and turns float noise on exactly-zero gradients (e.g.
attention key biases) into steps of size lr, which would hide what is compared here, the
gradients. AV-data2vec *pre-training* cannot match exactly by design (BatchNorm statistics and
span masks are drawn per worker batch), so its recogniser is used, on audio.

In process: InfoNCE gradients with and without gathered negatives in a real 2-worker gloo
group, fairseq's ``all_gather_list`` without CUDA, and the rendezvous settings derived from
torchrun / SLURM variables for several nodes (what one machine can check of multi-node runs).

These helpers are shared with test_resume.py and test_checkpoint_safety.py.
"""
import json
import os
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
SYNCHFORMER_RECIPE = REPO / "examples" / "synchformer" / "conf" / "pretrain" / "tiny_synthetic.yaml"
AV_DATA2VEC_RECIPE = REPO / "examples" / "av_data2vec" / "conf" / "finetune" / "tiny_synthetic.yaml"
# Synchformer stage 1 at test size (the recipe's tiny towers, 4 segments of 32 x 32 frames)
SYNCHFORMER_TEST_OVERRIDES = [
    "task.num_segments=4", "task.crop_size=32", "dataset.num_workers=0", "lr_scheduler.warmup_updates=0",
]
NO_DROPOUT = {
    SYNCHFORMER_RECIPE: ["++model.video_drop_path=0", "++model.audio_drop_path=0"],
    AV_DATA2VEC_RECIPE: [f"++model.{name}=0" for name in (
        "dropout_input", "dropout", "attention_dropout", "activation_dropout", "encoder_layerdrop",
        "encoder_output_dropout", "decoder_dropout", "decoder_attention_dropout",
        "decoder_activation_dropout", "decoder_layerdrop",
    )],
}
LOG_RECORD = re.compile(r"\]\[(train_inner|train)\]\[INFO\] - (\{.*\})$", re.MULTILINE)
TIME_KEYS = {"wps", "ups", "wall", "train_wall", "gb_free"}  # logged values that depend on the clock


# --- helpers shared by the training tests -----------------------------------------------------
def make_speech_corpus(out: Path, num_clips: int = 8, duration_s: float = 9.0) -> Path:
    """A synthetic speech corpus of ``num_clips`` clips of ``duration_s`` seconds (6 train
    clips of 8; 9 s is long enough for every Synchformer layout)."""
    run_to_end([
        str(BIN / "avplugins-synth"), "speech", "--out", str(out), "--num-clips", str(num_clips),
        "--min-duration", str(duration_s), "--max-duration", str(duration_s), "--workers", "1", "--seed", "0",
    ])
    return out


def train_command(recipe: Path, save_dir: Path, overrides: Sequence[str], launcher: Sequence[str] = ()) -> List[str]:
    """``[launcher...] avplugins-train`` on ``recipe`` writing to ``save_dir``, json logs every update."""
    return [
        *launcher, str(BIN / "avplugins-train"), "--config-dir", str(recipe.parent), "--config-name", recipe.stem,
        f"checkpoint.save_dir={save_dir}", f"hydra.run.dir={save_dir}/hydra",
        "common.log_format=json", "common.log_interval=1", *overrides,
    ]


def start(command: Sequence[str], log_path: Path) -> subprocess.Popen:
    """Start ``command`` in the repository with one thread, stdout and stderr to ``log_path``."""
    with open(log_path, "w") as log:
        return subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, env=ENV, cwd=REPO)


def wait_all(processes: Dict[Path, subprocess.Popen], timeout_s: float = 900) -> None:
    """Wait for every process (keyed by its log file); fail with the log tail of any that failed."""
    for log_path, process in processes.items():
        try:
            return_code = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        assert return_code == 0, f"{log_path} exited with {return_code}:\n{log_path.read_text()[-4000:]}"


def run_to_end(command: Sequence[str], log_path: Path = None) -> str:
    """Run ``command`` to its end (must succeed); returns its output."""
    if log_path is None:
        result = subprocess.run(list(command), capture_output=True, text=True, env=ENV, cwd=REPO, timeout=900)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout + result.stderr
    wait_all({log_path: start(command, log_path)})
    return log_path.read_text()


def log_records(log_text: str, kind: str = "train_inner") -> List[dict]:
    """fairseq's json log records of ``kind`` (``train_inner``: one per update; ``train``: one
    per epoch), without the clock-dependent values."""
    return [
        {key: value for key, value in json.loads(record).items() if key.removeprefix(f"{kind}_") not in TIME_KEYS}
        for record_kind, record in LOG_RECORD.findall(log_text) if record_kind == kind
    ]


def assert_same_records(records_a: List[dict], records_b: List[dict]) -> None:
    """Same keys and, for numbers, the same value up to the last digit fairseq printed."""
    assert [sorted(record) for record in records_a] == [sorted(record) for record in records_b]
    for record_a, record_b in zip(records_a, records_b):
        for key, value in record_a.items():
            same = math.isclose(float(value), float(record_b[key]), rel_tol=1e-4, abs_tol=1e-3)
            assert same, (key, record_a, record_b)


def model_parameters(checkpoint: Path) -> Dict[str, torch.Tensor]:
    from avplugins.checkpoint import load_checkpoint_state

    return load_checkpoint_state(str(checkpoint))["model"]


def max_abs_difference(checkpoint_a: Path, checkpoint_b: Path) -> float:
    """Largest |a - b| over every model tensor of two checkpoints (same keys required)."""
    a, b = model_parameters(checkpoint_a), model_parameters(checkpoint_b)
    assert a.keys() == b.keys()
    return max((a[key].double() - b[key].double()).abs().max().item() for key in a)


# --- end to end: 2 workers x B == 1 process x 2B ----------------------------------------------
def sgd_overrides(recipe: Path, lr: float) -> List[str]:
    """Replace the recipe's optimizer by plain SGD (fairseq's ``sgd``) at a constant ``lr``."""
    recipe_keys = OmegaConf.load(recipe).optimizer.keys()
    return [
        "optimizer._name=sgd",
        *[f"~optimizer.{key}" for key in recipe_keys if key not in ("_name", "weight_decay")],
        f"optimization.lr=[{lr}]", f"++optimizer.lr=[{lr}]", "++optimizer.momentum=0.0",
        "++optimizer.weight_decay=0.0",
    ]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_speech_corpus(tmp_path_factory.mktemp("distributed") / "speech")


def compare_one_and_two_workers(tmp_path, recipe, overrides, batch_size, two_worker_launcher=()):
    """Train 1 x 2B and 2 x B at once; returns (max abs parameter difference, the two logs)."""
    runs = {}
    for name, world_size, batch in (("one", 1, 2 * batch_size), ("two", 2, batch_size)):
        command = train_command(recipe, tmp_path / name, [
            *overrides, *NO_DROPOUT[recipe], *sgd_overrides(recipe, lr=0.1),
            "optimization.max_update=3", "dataset.disable_validation=true",
            f"dataset.batch_size={batch}", f"distributed_training.distributed_world_size={world_size}",
        ], launcher=two_worker_launcher if world_size == 2 else ())
        runs[tmp_path / f"{name}.log"] = start(command, tmp_path / f"{name}.log")
    wait_all(runs)
    logs = [(tmp_path / f"{name}.log").read_text() for name in ("one", "two")]
    difference = max_abs_difference(tmp_path / "one" / "checkpoint_last.pt", tmp_path / "two" / "checkpoint_last.pt")
    return difference, logs


def test_synchformer_two_spawned_cpu_workers_match_one_double_batch(corpus, tmp_path):
    difference, (one_log, two_log) = compare_one_and_two_workers(
        tmp_path, SYNCHFORMER_RECIPE,
        [f"task.data={corpus}", *SYNCHFORMER_TEST_OVERRIDES, "++criterion.gather_negatives=true"],
        batch_size=3,
    )
    assert "spawning 2 CPU workers" in two_log and "gloo backend" in two_log
    one_records, two_records = log_records(one_log), log_records(two_log)
    assert [r["num_updates"] for r in two_records] == ["1", "2", "3"]
    assert_same_records(two_records, one_records)  # every logged loss, accuracy, gradient norm, batch size
    assert len({r["loss"] for r in one_records}) == 3  # the parameters moved
    assert difference <= 1e-5


def test_av_data2vec_two_torchrun_cpu_workers_match_one_double_batch(corpus, tmp_path):
    if not AV_DATA2VEC_RECIPE.is_file():
        pytest.skip(f"{AV_DATA2VEC_RECIPE} not written yet")
    difference, (one_log, two_log) = compare_one_and_two_workers(
        tmp_path, AV_DATA2VEC_RECIPE,
        [f"task.data={corpus}", "task.modalities=audio", "model.w2v_path=null", "dataset.max_tokens=null",
         "lr_scheduler.phase_ratio=[0.0,0.5,0.5]",
         # audio only: the video frontend gets no gradient, which DDP must be told
         "distributed_training.find_unused_parameters=true"],
        batch_size=3,
        two_worker_launcher=[str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2"],
    )
    assert "distributed init (rank 1): env://" in two_log
    one_records, two_records = log_records(one_log), log_records(two_log)
    assert [r["num_updates"] for r in two_records] == ["1", "2", "3"]
    assert_same_records(two_records, one_records)
    assert len({r["loss"] for r in one_records}) == 3
    assert difference <= 1e-5


# --- in process: gathered InfoNCE negatives, all_gather_list, rendezvous settings ------------
NUM_CLIPS, NUM_SEGMENTS, DIM = 4, 3, 8  # the whole batch; each of 2 workers holds 2 clips


class FixedEmbeddings(torch.nn.Module):
    """Stands in for the towers: its parameters are the (unnormalised) segment embeddings of
    the whole batch, (NUM_CLIPS, NUM_SEGMENTS, DIM); ``forward(clips)`` returns those rows."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.video = torch.nn.Parameter(torch.randn(NUM_CLIPS, NUM_SEGMENTS, DIM, generator=generator))
        self.audio = torch.nn.Parameter(torch.randn(NUM_CLIPS, NUM_SEGMENTS, DIM, generator=generator))

    def forward(self, clips):
        return {
            "video_embeddings": F.normalize(self.video[clips], dim=-1),
            "audio_embeddings": F.normalize(self.audio[clips], dim=-1),
            "temperature": torch.tensor(0.1),
        }


def infonce_gradients(clips: torch.Tensor, gather_negatives: bool) -> torch.Tensor:
    """Gradient of the segment_infonce criterion's loss on ``clips`` w.r.t. every embedding,
    flattened: (2 * NUM_CLIPS * NUM_SEGMENTS * DIM,)."""
    from avplugins.criterions.segment_infonce import SegmentInfoNCECriterion

    model = FixedEmbeddings()
    criterion = SegmentInfoNCECriterion(task=None, gather_negatives=gather_negatives)
    loss, _, _ = criterion(model, {"net_input": {"clips": clips}, "nsentences": len(clips)})
    loss.backward()
    return torch.cat([model.video.grad.flatten(), model.audio.grad.flatten()])


def _gloo_worker(rank: int, init_file: str, out_dir: str) -> None:
    """One of 2 workers: its half of the clips; writes the summed gradients (what DDP applies)
    and what fairseq's all_gather_list returned."""
    import torch.distributed as dist
    from fairseq.distributed import utils as distributed_utils

    from avplugins.distributed import apply_fairseq_fixes

    apply_fairseq_fixes()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    local_clips = torch.arange(rank * NUM_CLIPS // 2, (rank + 1) * NUM_CLIPS // 2)
    result = {}
    for gather in (True, False):
        gradient = infonce_gradients(local_clips, gather)
        dist.all_reduce(gradient)
        result[f"gather={gather}"] = gradient
    result["all_gather_list"] = distributed_utils.all_gather_list({"rank": rank, "clips": local_clips.tolist()})
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    # the process groups are destroyed at exit (apply_fairseq_fixes registered that)


@pytest.fixture(scope="module")
def two_gloo_workers(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("gloo")
    torch.multiprocessing.spawn(_gloo_worker, args=(str(out_dir / "init"), str(out_dir)), nprocs=2, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(2)]


def test_infonce_with_gathered_negatives_has_the_gradient_of_the_whole_batch(two_gloo_workers):
    whole_batch = infonce_gradients(torch.arange(NUM_CLIPS), gather_negatives=False)  # one process
    for worker in two_gloo_workers:
        torch.testing.assert_close(worker["gather=True"], whole_batch, rtol=0, atol=1e-6)
        # local negatives only: a different loss, so a different gradient
        assert (worker["gather=False"] - whole_batch).abs().max() > 1e-2


def test_all_gather_list_works_without_cuda(two_gloo_workers):
    expected = [{"rank": 0, "clips": [0, 1]}, {"rank": 1, "clips": [2, 3]}]
    assert [worker["all_gather_list"] for worker in two_gloo_workers] == [expected, expected]


@pytest.fixture
def no_launcher_environment(monkeypatch, tmp_path):
    """No torchrun or SLURM variables; a fake ``scontrol`` (SLURM's host list) on PATH."""
    for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_JOB_ID",
                 "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NNODES", "SLURM_NTASKS_PER_NODE",
                 "SLURM_NTASKS", "SLURM_NODEID", "SLURM_PROCID", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    scontrol = tmp_path / "scontrol"
    scontrol.write_text("#!/bin/sh\n# scontrol show hostnames LIST\nprintf 'node-a\\nnode-b\\n'\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    return monkeypatch


def distributed_config(**values):
    from fairseq.dataclass.configs import DistributedTrainingConfig

    return DistributedTrainingConfig(**values)


def test_torchrun_variables_of_a_second_node_set_rank_and_world_size(no_launcher_environment):
    from avplugins.distributed import infer_cpu_init_method

    for name, value in {"MASTER_ADDR": "node-a", "MASTER_PORT": "29500", "WORLD_SIZE": "4", "RANK": "3",
                        "LOCAL_RANK": "1"}.items():
        no_launcher_environment.setenv(name, value)
    cfg = distributed_config(distributed_world_size=1)  # torchrun's world size wins
    infer_cpu_init_method(cfg)
    assert (cfg.distributed_init_method, cfg.distributed_world_size, cfg.distributed_rank, cfg.device_id,
            cfg.distributed_no_spawn) == ("env://", 4, 3, 1, True)


def test_slurm_one_task_per_worker_on_two_nodes(no_launcher_environment):
    from avplugins.distributed import infer_cpu_init_method

    for name, value in {"SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "2",
                        "SLURM_NODEID": "1", "SLURM_PROCID": "3", "SLURM_LOCALID": "1"}.items():
        no_launcher_environment.setenv(name, value)
    cfg = distributed_config(distributed_world_size=4, distributed_port=12345)
    infer_cpu_init_method(cfg)
    assert (cfg.distributed_init_method, cfg.distributed_world_size, cfg.distributed_rank, cfg.device_id,
            cfg.distributed_no_spawn) == ("tcp://node-a:12345", 4, 3, 1, True)


def test_slurm_one_task_per_node_spawns_its_share(no_launcher_environment):
    from avplugins.distributed import infer_cpu_init_method

    for name, value in {"SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "1",
                        "SLURM_NODEID": "1", "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}.items():
        no_launcher_environment.setenv(name, value)
    cfg = distributed_config(distributed_world_size=6, distributed_port=12345)
    infer_cpu_init_method(cfg)
    assert (cfg.distributed_init_method, cfg.distributed_world_size, cfg.distributed_rank,
            cfg.distributed_num_procs, cfg.distributed_no_spawn) == ("tcp://node-a:12345", 6, 3, 3, False)

    uneven = distributed_config(distributed_world_size=5, distributed_port=12345)
    with pytest.raises(ValueError, match="distributed_world_size=5 must be a multiple of the 2 SLURM nodes"):
        infer_cpu_init_method(uneven)


def test_one_machine_spawns_every_worker_at_a_free_local_port(no_launcher_environment):
    from avplugins.distributed import infer_cpu_init_method

    cfg = distributed_config(distributed_world_size=3)
    infer_cpu_init_method(cfg)
    assert cfg.distributed_init_method == f"tcp://localhost:{cfg.distributed_port}"
    assert cfg.distributed_port > 0 and cfg.distributed_num_procs == 3 and not cfg.distributed_no_spawn


def test_train_cli_adds_the_plugin_user_dir_unless_given():
    from avplugins.cli.train import with_user_dir

    assert with_user_dir(["task.data=d"], "/plugin") == ["task.data=d", "common.user_dir=/plugin"]
    assert with_user_dir(["common.user_dir=/mine"], "/plugin") == ["common.user_dir=/mine"]
