"""Loading checkpoints without executing pickled code.

fairseq writes checkpoints with ``torch.save``; besides tensors they hold plain containers,
the training metrics (fairseq meter objects) and numpy scalars. :func:`load_checkpoint_state`
reads them with ``torch.load(weights_only=True)`` and an explicit allow-list of exactly those
classes, so a file carrying any other pickled object (e.g. a payload that would run code) is
refused with a clear error instead of being executed.
"""
import collections
import os
from typing import Any, Dict, Optional

import numpy as np
import torch


class UnsafeCheckpointError(RuntimeError):
    """The file holds pickled objects outside the allow-list; it was not loaded."""


class CorruptCheckpointError(RuntimeError):
    """The file is empty, cut short or not a torch checkpoint at all."""


def allowed_checkpoint_globals() -> list:
    """The classes a fairseq checkpoint of this project may contain besides tensors."""
    from fairseq.logging import meters

    return [
        collections.OrderedDict,
        collections.defaultdict,
        meters.AverageMeter,
        meters.SumMeter,
        meters.TimeMeter,
        meters.StopwatchMeter,
        meters.MetersDict,
        np.dtype,
        np.ndarray,
        np._core.multiarray._reconstruct,
        np._core.multiarray.scalar,
        *[type(np.dtype(name)) for name in ("float64", "float32", "int64", "int32", "bool")],
    ]


def load_checkpoint_state(path: str) -> Dict[str, Any]:
    """``torch.load`` of a checkpoint onto the CPU with weights-only unpickling and our allow-list.

    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: the file needs a class outside the allow-list (nothing of it ran).
        CorruptCheckpointError: the file is empty, truncated or not a torch checkpoint.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with torch.serialization.safe_globals(allowed_checkpoint_globals()):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except torch.serialization.pickle.UnpicklingError as error:
            if "Unsupported operand" in str(error) or "truncated" in str(error):  # not a pickle
                raise _corrupt(path, error) from None
            raise UnsafeCheckpointError(
                f"{path}: refused to load: it contains pickled objects outside the allow-list of "
                f"tensors, containers and fairseq metrics ({str(error).splitlines()[0]}). A file "
                "that would run code when unpickled is never loaded here; only use checkpoints "
                "from sources you trust, and import official ones with `avplugins-convert`."
            ) from None
        except (RuntimeError, EOFError) as error:  # a zip archive cut short; an empty file
            raise _corrupt(path, error) from None


def _corrupt(path: str, error: Exception) -> CorruptCheckpointError:
    reason = (str(error).splitlines() or [""])[0] or type(error).__name__
    return CorruptCheckpointError(
        f"{path}: not a readable checkpoint: the file is empty, cut short or not a torch file "
        f"({os.path.getsize(path)} bytes; {reason}). Use another checkpoint of the run "
        "(checkpoint_best.pt, an earlier checkpoint<N>.pt) or train this stage again."
    )


def load_model_and_config(path: str, device: Optional[str] = None, task_overrides: Optional[dict] = None):
    """Like :func:`load_model`, also returning the checkpoint's config (an OmegaConf ``DictConfig``
    with ``model``, ``task``, ...), so callers need not read the file twice."""
    from fairseq import tasks
    from omegaconf import OmegaConf, open_dict

    state = load_checkpoint_state(path)
    if not state.get("cfg") or "model" not in state:
        raise ValueError(f"{path}: not a fairseq checkpoint of this project (no 'cfg' or 'model' entry)")
    cfg = OmegaConf.create(state["cfg"])
    with open_dict(cfg):
        for key, value in (task_overrides or {}).items():
            cfg.task[key] = value
    task = tasks.setup_task(cfg.task, from_checkpoint=True)
    # build without allocating or initialising weights (minutes at the paper's size on a CPU),
    # then take the checkpoint's tensors as they are
    # through the task: it knows which pretrained parts the checkpoint's own weights replace
    with torch.device("meta"):
        model = task.build_model(cfg.model, from_checkpoint=True)
    # nn.Module's own loader: fairseq's override has no `assign` (and nothing to upgrade here)
    torch.nn.Module.load_state_dict(model, state["model"], strict=True, assign=True)
    still_meta = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if still_meta:  # tensors a checkpoint does not hold (non-persistent buffers): build normally
        model = task.build_model(cfg.model, from_checkpoint=True)
        model.load_state_dict(state["model"], strict=True)
    return model.to(device or "cpu").eval(), cfg


def load_model(path: str, device: Optional[str] = None, task_overrides: Optional[dict] = None):
    """Load any checkpoint this project writes or imports, in eval mode.

    Args:
        path: a fairseq checkpoint of one of our models (training output, or written by
            ``avplugins-convert``).
        device: torch device (default CPU).
        task_overrides: task config values to replace, e.g. ``{"data": "/new/place"}`` when the
            model needs its task's dictionary and the training data folder moved.
    Returns:
        the model (``torch.nn.Module``) in eval mode on ``device``.
    """
    return load_model_and_config(path, device, task_overrides)[0]
