"""Fixes from our side for fairseq's data-parallel training on CPUs and its checkpoint files.

:func:`apply_fairseq_fixes` patches these fairseq functions (never its files). ``import
avplugins`` applies it, so every fairseq command that loads the plugin as its user dir
(``fairseq-hydra-train``, ``fairseq-generate``, ...) has the fixes from then on. fairseq imports
the user dir only inside ``fairseq_cli.train.main``, after its launcher has decided, so the
launcher fix needs ``avplugins-train``, which imports the plugin before fairseq starts; every
CPU worker it spawns imports the plugin again (a spawned interpreter starts with fairseq
unpatched):

- ``distributed_utils.call_main``: fairseq spawns ``min(torch.cuda.device_count(), world_size)``
  workers (none on a CPU), asserts ``world_size <= device_count`` for one machine and divides
  the torchrun rank by the device count. On CPU runs (no GPU, or ``common.cpu=true``) our
  :func:`call_main` chooses the gloo backend instead of the nccl default, derives rank, world
  size and init method from torchrun / SLURM variables or spawns ``world_size`` local workers,
  then hands each worker to fairseq's own ``call_main``. GPU runs go to fairseq unchanged.
- ``DistributedDataParallel`` as used by ``DistributedFairseqModel``: fairseq always passes
  ``device_ids=[device_id]``, which torch refuses for a module on the CPU.
- ``distributed_utils.all_gather_list`` (used by the trainer for criteria whose logging outputs
  cannot be summed) stages its data in a CUDA buffer; gloo groups gather with
  ``torch.distributed.all_gather_object`` instead.
- ``checkpoint_utils.PathManager.copy``: fairseq writes the first checkpoint file of a save
  atomically (``.tmp`` then rename) but *copies* it to the others (``checkpoint_last.pt``
  whenever an epoch or update checkpoint is written too) in place, so a kill during the copy
  leaves a truncated ``checkpoint_last.pt``. Our copy goes through a ``.tmp`` file and a rename.
- ``checkpoint_utils.load_checkpoint_to_cpu`` (resume, ``fairseq-generate``): loads under the
  same allow-list as :func:`avplugins.checkpoint.load_checkpoint_state` and reports a refused
  file as :class:`avplugins.checkpoint.UnsafeCheckpointError`, an unreadable one (empty, cut
  short, not a torch file) as :class:`avplugins.checkpoint.CorruptCheckpointError`.
- at exit (``atexit``, while the interpreter is still whole): :func:`wait_for_prefetch_threads`
  and :func:`release_process_groups`, each of which avoids an abort of a finished run.
"""
import atexit
import gc
import logging
import os
import pickle
import random
import shutil
import socket
import threading
import time

import torch
import torch.distributed as dist
from fairseq import checkpoint_utils, file_io
from fairseq import utils as fairseq_utils
from fairseq.data import iterators
from fairseq.distributed import utils as distributed_utils
from fairseq.models import distributed_fairseq_model
from torch.nn.parallel import DistributedDataParallel

from avplugins.checkpoint import allowed_checkpoint_globals, load_checkpoint_state

logger = logging.getLogger(__name__)

TORCHRUN_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")

# fairseq's functions as they were before patching (filled once by apply_fairseq_fixes)
_FAIRSEQ = {}


def runs_on_cpu(cfg) -> bool:
    """True when the workers of this fairseq config train on CPUs (no GPU, or common.cpu)."""
    return not torch.cuda.is_available() or bool(cfg.common.cpu)


def _port_for_this_job() -> int:
    """A TCP port for the rendezvous of one machine's workers: derived from the SLURM job id
    (every task of the job agrees, as in fairseq), else a port the OS reports free."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if job_id is not None:
        return random.Random(int(job_id + os.environ.get("SLURM_ARRAY_TASK_ID", ""))).randint(10000, 60000)
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def infer_cpu_init_method(dt_cfg) -> None:
    """Fill in ``dt_cfg`` (fairseq's ``distributed_training`` config) for CPU workers: what
    fairseq's ``infer_init_method`` derives from the GPU count.

    - torchrun / ``torch.distributed.launch`` (``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``,
      ``RANK`` set; any number of nodes): ``env://``, rank and world size from the environment
      (they win over ``distributed_world_size``), this process is one worker.
    - SLURM with ``distributed_port`` set (fairseq's own SLURM logic): one task per worker
      (``--ntasks-per-node`` = workers per node), or one task per node that spawns
      ``distributed_world_size / nodes`` workers.
    - otherwise one machine: this process spawns ``distributed_world_size`` workers that meet at
      ``tcp://localhost:<port>``.
    Sets ``distributed_num_procs`` to the number of workers this process spawns (when it spawns).
    """
    if dt_cfg.distributed_init_method is not None:
        return
    if all(name in os.environ for name in TORCHRUN_VARIABLES):
        if int(os.environ["WORLD_SIZE"]) > 1:
            dt_cfg.distributed_init_method = "env://"
            dt_cfg.distributed_world_size = int(os.environ["WORLD_SIZE"])
            dt_cfg.distributed_rank = int(os.environ["RANK"])
            dt_cfg.device_id = int(os.environ.get("LOCAL_RANK", 0))
            dt_cfg.distributed_no_spawn = True
        return
    world_size = dt_cfg.distributed_world_size
    if world_size <= 1:
        return
    if distributed_utils._infer_slurm_init(dt_cfg, None):  # False outside SLURM
        if not dt_cfg.distributed_no_spawn:
            # fairseq's one-task-per-node branch counted GPUs (0 here): spawn this node's share
            num_nodes = int(os.environ["SLURM_NNODES"])
            if world_size % num_nodes:
                raise ValueError(
                    f"distributed_training.distributed_world_size={world_size} must be a multiple of "
                    f"the {num_nodes} SLURM nodes when each node runs one task that spawns its workers"
                )
            dt_cfg.distributed_num_procs = world_size // num_nodes
            dt_cfg.distributed_rank = int(os.environ["SLURM_NODEID"]) * dt_cfg.distributed_num_procs
            dt_cfg.distributed_world_size = world_size
        if dt_cfg.distributed_port <= 0:  # as fairseq: no port given means one machine
            dt_cfg.distributed_init_method = f"tcp://localhost:{_port_for_this_job()}"
        return
    if dt_cfg.distributed_port <= 0:
        dt_cfg.distributed_port = _port_for_this_job()
    dt_cfg.distributed_init_method = f"tcp://localhost:{dt_cfg.distributed_port}"
    dt_cfg.distributed_num_procs = world_size


def call_main(cfg, main, **kwargs):
    """fairseq's ``distributed_utils.call_main`` that also launches CPU workers (see the module
    docstring); each worker then runs fairseq's own ``call_main`` as a single process of the
    group. GPU runs are fairseq's unchanged."""
    dt_cfg = cfg.distributed_training
    if not runs_on_cpu(cfg) or cfg.common.tpu:
        return _FAIRSEQ["call_main"](cfg, main, **kwargs)
    infer_cpu_init_method(dt_cfg)
    if dt_cfg.distributed_init_method is not None and dt_cfg.distributed_backend == "nccl":
        dt_cfg.distributed_backend = "gloo"  # fairseq's default, but NCCL reduces GPU tensors only
    if dt_cfg.distributed_init_method is None or dt_cfg.distributed_no_spawn:
        return _FAIRSEQ["call_main"](cfg, main, **kwargs)
    logger.info(
        "spawning %d CPU workers (ranks from %d of %d, %s backend, %s)",
        dt_cfg.distributed_num_procs, dt_cfg.distributed_rank, dt_cfg.distributed_world_size,
        dt_cfg.distributed_backend, dt_cfg.distributed_init_method,
    )
    torch.multiprocessing.spawn(
        fn=_spawned_cpu_worker, args=(cfg, main, kwargs), nprocs=dt_cfg.distributed_num_procs, join=True
    )


def _spawned_cpu_worker(local_rank: int, cfg, main, kwargs) -> None:
    """Entry point of a CPU worker started by :func:`call_main` in a fresh interpreter (which
    imported ``avplugins`` to find this function: our tasks, models and criteria are registered
    and the fixes applied)."""
    dt_cfg = cfg.distributed_training
    dt_cfg.distributed_rank += local_rank
    dt_cfg.device_id = local_rank
    dt_cfg.distributed_no_spawn = True
    _FAIRSEQ["call_main"](cfg, main, **kwargs)


def wait_for_prefetch_threads(timeout_s: float = 60.0) -> None:
    """Let fairseq's batch-prefetch threads reach a safe state before Python exits.

    fairseq's ``BufferedIterator`` loads batches ahead in a daemon thread. When training stops
    mid-epoch (``max_update``), that thread may still be decoding a batch when the interpreter
    exits; CPython then ends it inside C++ code (PyAV, torch), which aborts the finished run
    ("terminate called without an active exception", exit status 134). Wait (at most
    ``timeout_s``) until each such thread has ended or blocks on its full queue, in Python.
    """
    deadline = time.monotonic() + timeout_s
    for thread in threading.enumerate():
        if isinstance(thread, iterators.BackgroundConsumer):
            while thread.is_alive() and not thread._queue.full() and time.monotonic() < deadline:
                time.sleep(0.01)


def release_process_groups() -> None:
    """Destroy this worker's process groups while the interpreter is fully alive.

    fairseq caches its global group on ``get_global_group`` and never destroys it, so the gloo
    group's C++ threads otherwise end during interpreter finalization, which now and then
    aborts a finished worker ("terminate called without an active exception")."""
    if dist.is_initialized():
        dist.destroy_process_group()
    if hasattr(distributed_utils.get_global_group, "_global_group"):
        del distributed_utils.get_global_group._global_group
    gc.collect()


class CPUCapableDistributedDataParallel(DistributedDataParallel):
    """torch DDP that drops fairseq's ``device_ids`` / ``output_device`` for a module on the
    CPU (torch requires None there); unchanged for GPU modules."""

    def __init__(self, module, device_ids=None, output_device=None, **kwargs):
        if next(module.parameters()).device.type == "cpu":
            device_ids = output_device = None
        super().__init__(module, device_ids=device_ids, output_device=output_device, **kwargs)


def all_gather_list(data, group=None, max_size=16384):
    """fairseq's ``all_gather_list`` (a list of every worker's picklable ``data``). fairseq's
    stages the data in a CUDA buffer, which only NCCL needs; gloo groups use
    ``torch.distributed.all_gather_object``."""
    group = distributed_utils.get_global_group() if group is None else group
    if distributed_utils.use_xla() or dist.get_backend(group) == dist.Backend.NCCL:
        return _FAIRSEQ["all_gather_list"](data, group=group, max_size=max_size)
    gathered = [None] * distributed_utils.get_world_size(group)
    dist.all_gather_object(gathered, fairseq_utils.move_to_cpu(data), group=group)
    return gathered


class AtomicCopyPathManager(file_io.PathManager):
    """fairseq's ``PathManager`` whose ``copy`` to a local file cannot leave a partial file:
    it copies to ``<dst>.tmp`` and renames (atomic on POSIX), like fairseq's own saves."""

    @staticmethod
    def copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
        if not file_io.PathManager.supports_rename(dst_path):
            return file_io.PathManager.copy(src_path, dst_path, overwrite=overwrite)
        if not overwrite and os.path.exists(dst_path):
            raise FileExistsError(f"{dst_path} exists and overwrite=False")
        shutil.copyfile(src_path, dst_path + ".tmp")
        os.replace(dst_path + ".tmp", dst_path)
        return True


def load_checkpoint_to_cpu(path, arg_overrides=None, load_on_all_ranks=False):
    """fairseq's ``load_checkpoint_to_cpu`` with our checkpoint allow-list in force.

    Raises:
        UnsafeCheckpointError: the file holds pickled objects outside the allow-list (torch's
            weights-only unpickler refused them; nothing of them ran).
        CorruptCheckpointError: the file is empty, truncated or not a torch checkpoint.
    """
    with torch.serialization.safe_globals(allowed_checkpoint_globals()):
        try:
            return _FAIRSEQ["load_checkpoint_to_cpu"](path, arg_overrides, load_on_all_ranks)
        except (pickle.UnpicklingError, RuntimeError, EOFError):
            if os.path.isfile(path):
                load_checkpoint_state(path)  # raises the error that names the file and the cause
            raise


def apply_fairseq_fixes() -> None:
    """Patch fairseq (see the module docstring). Idempotent; a no-op after the first call."""
    if _FAIRSEQ:
        return
    _FAIRSEQ["call_main"] = distributed_utils.call_main
    _FAIRSEQ["all_gather_list"] = distributed_utils.all_gather_list
    _FAIRSEQ["load_checkpoint_to_cpu"] = checkpoint_utils.load_checkpoint_to_cpu
    distributed_utils.call_main = call_main
    distributed_utils.all_gather_list = all_gather_list
    distributed_fairseq_model.DistributedDataParallel = CPUCapableDistributedDataParallel
    checkpoint_utils.PathManager = AtomicCopyPathManager
    checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu
    atexit.register(release_process_groups)
    atexit.register(wait_for_prefetch_threads)  # atexit runs the last registered first
