"""``avplugins-convert``: import another project's checkpoint as a fairseq checkpoint of ours.

    avplugins-convert synchformer OFFICIAL.pt OUT.pt [--video-heads N] [--audio-heads N] [--sync-heads N]

An official Synchformer stage-1 file becomes a ``synchformer_segment_clip`` checkpoint (task
``av_sync_pretraining``), a stage-2 or synchronizability file a ``synchformer`` checkpoint
(task ``av_sync``). The output is what fairseq's trainer writes, minus the optimizer: ``cfg``
(a plain-dict config with every field of the model, task and criterion dataclasses), ``model``
(our state dict), ``args: None`` and the bookkeeping entries ``checkpoint_utils`` upgrades, so
``fairseq-validate``, ``avplugins.load_model`` and ``avsync predict`` load it.

Sizes (widths, depths, frame and patch grids, segments) are read from tensor shapes, the rest
from the official config stored in the file; the number of attention heads is not visible in
any shape: it comes from the config where recorded, else the paper's value for a paper-width
tower, else ``--*-heads``.

:func:`fairseq_checkpoint` and :func:`save_checkpoint` are the one writer of such checkpoints
(tests build theirs with them too).
"""
import argparse
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

import torch
from fairseq import models, tasks
from fairseq.criterions import CRITERION_DATACLASS_REGISTRY, CRITERION_REGISTRY
from fairseq.dataclass.configs import FairseqConfig
from fairseq.models import MODEL_DATACLASS_REGISTRY
from fairseq.tasks import TASK_DATACLASS_REGISTRY
from omegaconf import OmegaConf, open_dict

from avplugins.convert.synchformer import (
    STAGE1,
    SYNCHRONIZABILITY,
    OfficialCheckpoint,
    fit_sync_positions,
    load_official_checkpoint,
)
from avplugins.models._synchformer_towers import SynchformerTowersConfig
from avplugins.modules.ast import patch_grid

# The paper's widths and attention heads (Motionformer ViT-B, AST base, sync module).
PAPER_WIDTH = 768
PAPER_HEADS = {"video": 12, "audio": 12, "sync": 8}
MLP_RATIO = 4  # every transformer of Synchformer; our configs have no field for another ratio
# Official stage-2 segments overlap by half (``data.step_size_seg`` 0.5).
DEFAULT_SEGMENT_STEP = 0.5
PAPER_SIZE_BEFORE_CROP = 256
PAPER_CROP = 224


# ----------------------------------------------------------------------------- writer


def fairseq_config(
    model_name: str,
    task_name: str,
    criterion_name: str,
    model_overrides: Optional[Mapping[str, Any]] = None,
    task_overrides: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """A complete fairseq config as plain dicts, as the trainer saves it: every top-level group
    of ``FairseqConfig`` with its defaults, and ``model``/``task``/``criterion`` holding every
    field of the registered dataclasses (``_name`` set), the overrides applied and all
    interpolations (e.g. the model's ``num_segments: ${task.num_segments}``) resolved. Mandatory
    fields left unset (``task.data``: inference needs no data folder) are written as ``""``;
    give them when loading (``fairseq-validate DATA``, ``load_model(task_overrides=...)``).

    Raises:
        KeyError: an unregistered name.
        omegaconf.errors.ConfigKeyError / ValidationError: an override that is not a field, or of
            the wrong type.
    """
    groups = {
        "model": (MODEL_DATACLASS_REGISTRY, model_name, model_overrides),
        "task": (TASK_DATACLASS_REGISTRY, task_name, task_overrides),
        "criterion": (CRITERION_DATACLASS_REGISTRY, criterion_name, None),
    }
    cfg = OmegaConf.structured(FairseqConfig)
    with open_dict(cfg):
        for group, (registry, name, _) in groups.items():
            if name not in registry:
                raise KeyError(f"no fairseq {group} named {name!r} is registered")
            cfg[group] = OmegaConf.structured(registry[name])
            cfg[group]._name = name
    for group, (_, _, overrides) in groups.items():
        for key, value in (overrides or {}).items():
            cfg[group][key] = value
        # fairseq cannot rebuild a task or model from a checkpoint holding a missing (???) value
        for key in cfg[group]:
            if OmegaConf.is_missing(cfg[group], key):
                cfg[group][key] = ""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def fairseq_checkpoint(cfg: Mapping[str, Any], model_state: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """The checkpoint dict for ``cfg`` (see :func:`fairseq_config`) and a model state dict: the
    entries of fairseq's ``Trainer.state_dict`` that loading reads, with no optimizer state (a
    run restored from it starts a fresh optimizer at update 0)."""
    return {
        "args": None,
        "cfg": dict(cfg),
        "model": dict(model_state),
        "criterion": None,
        "optimizer_history": [
            {
                "criterion_name": CRITERION_REGISTRY[cfg["criterion"]["_name"]].__name__,
                "optimizer_name": None,
                "lr_scheduler_state": {},
                "num_updates": 0,
            }
        ],
        "task_state": {},
        "extra_state": {"train_iterator": {"epoch": 1, "iterations_in_epoch": 0}},
    }


def save_checkpoint(checkpoint: Mapping[str, Any], path: str) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it to ``path``, so that
    ``path`` never holds a partial file (an interrupted run leaves the old one or none)."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {path}: the folder {folder} does not exist; create it first")
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(dict(checkpoint), stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


# ----------------------------------------------------------------------------- Synchformer sizes


def _lookup(config: Optional[Mapping[str, Any]], dotted: str) -> Any:
    """``config["a"]["b"]...`` for ``"a.b..."``, or None when any part is missing."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _depth(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Number of ``{prefix}N.`` blocks in the state dict."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for m in map(pattern.match, state) if m}
    return max(indices) + 1 if indices else 0


def _require(state: Mapping[str, torch.Tensor], key: str, path: str) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"{path}: the official weights lack {key!r} (our name); the file is incomplete")
    return state[key]


def _heads(tower: str, dim: int, recorded: Optional[int], given: Optional[int], path: str) -> int:
    """Attention heads of a tower: ``--{tower}-heads``, else the official config's value, else
    the paper's for a paper-width tower."""
    heads = given or recorded or (PAPER_HEADS[tower] if dim == PAPER_WIDTH else None)
    if heads is None:
        raise ValueError(
            f"{path}: cannot tell the number of attention heads of the {tower} transformer (width "
            f"{dim}, not the paper's {PAPER_WIDTH}; no shape shows it): pass --{tower}-heads N"
        )
    if dim % heads:
        raise ValueError(f"{path}: {tower} width {dim} is not divisible by {heads} heads; check --{tower}-heads")
    return heads


def _check_mlp(state: Mapping[str, torch.Tensor], key: str, dim: int, path: str) -> None:
    hidden = _require(state, key, path).shape[0]
    if hidden != MLP_RATIO * dim:
        raise ValueError(
            f"{path}: {key} has {hidden} hidden units for width {dim}; our models support an MLP "
            f"ratio of {MLP_RATIO} only"
        )


@dataclass
class TowerSizes:
    """Model and task fields of both towers, read from the weights."""

    model: Dict[str, Any]
    segment_frames: int
    crop_size: int
    visual_tokens: int  # per segment
    audio_tokens: int  # per segment


def _tower_sizes(state, config, heads: Mapping[str, Optional[int]], path: str) -> TowerSizes:
    patch = _require(state, "visual.patch_embed.weight", path)  # (Dv, 3, tubelet, p, p)
    video_dim, _, tubelet, patch_size, _ = patch.shape
    grid = math.isqrt(_require(state, "visual.pos_embed", path).shape[1] - 1)
    visual_tokens = _require(state, "visual.temp_embed", path).shape[1]
    _check_mlp(state, "visual.blocks.0.mlp.fc1.weight", video_dim, path)

    audio_patch = _require(state, "audio.patch_embed.weight", path)  # (Da, 1, p, p)
    audio_dim, audio_patch_size = audio_patch.shape[0], audio_patch.shape[-1]
    audio_positions = _require(state, "audio.pos_embed", path).shape[1]
    _check_mlp(state, "audio.blocks.0.mlp.fc1.weight", audio_dim, path)
    model = dict(
        video_patch_size=patch_size, video_tubelet_size=tubelet, video_dim=video_dim,
        video_depth=_depth(state, "visual.blocks."),
        video_heads=_heads("video", video_dim, None, heads.get("video"), path),
        audio_patch_size=audio_patch_size, audio_dim=audio_dim,
        audio_depth=_depth(state, "audio.blocks."),
        audio_heads=_heads("audio", audio_dim, None, heads.get("audio"), path),
    )
    time_frames = _lookup(config, "model.params.afeat_extractor.params.max_spec_t")
    if time_frames is not None:
        model["audio_time_frames"] = int(time_frames)

    # AST's patch grid (the defaults: 128 mel bins, stride 10) must give the stored positions.
    defaults = SynchformerTowersConfig()
    stride = defaults.audio_stride
    freq = patch_grid(defaults.mel_bins, audio_patch_size, stride)
    audio_tokens = patch_grid(model.get("audio_time_frames", defaults.audio_time_frames), audio_patch_size, stride)
    if 2 + freq * audio_tokens != audio_positions:
        raise ValueError(
            f"{path}: the AST has {audio_positions} positions, not the {2 + freq * audio_tokens} of "
            f"{defaults.mel_bins} mel bins x {model.get('audio_time_frames', defaults.audio_time_frames)} "
            f"frames with stride {stride}; this importer supports Synchformer's spectrogram layout only"
        )
    return TowerSizes(model, visual_tokens * tubelet, grid * patch_size, visual_tokens, audio_tokens)


def _data_fields(config) -> Dict[str, Any]:
    """Task fields the official ``data`` section records (those present)."""
    fields = {
        "video_fps": _lookup(config, "data.vfps"),
        "sample_rate": _lookup(config, "data.afps"),
        "crop_s": _lookup(config, "data.crop_len_sec"),
        "max_offset_s": _lookup(config, "data.max_off_sec"),
        "num_offset_classes": _lookup(config, "data.num_off_cls"),
    }
    return {key: value for key, value in fields.items() if value is not None}


def synchformer_config(
    official: OfficialCheckpoint, path: str, heads: Optional[Mapping[str, Optional[int]]] = None
) -> Dict[str, Any]:
    """Our fairseq config for an official checkpoint (``state_dict`` under our names). For a
    sync module with more positions than the recorded segments need, the position embedding is
    trimmed in ``official.state_dict`` (as the official code does)."""
    heads = dict(heads or {})
    state, config = official.state_dict, official.config
    towers = _tower_sizes(state, config, heads, path)
    short_side = _lookup(config, "data.size_before_crop")
    task = dict(
        segment_frames=towers.segment_frames, crop_size=towers.crop_size,
        resize_short_side=int(short_side or round(towers.crop_size * PAPER_SIZE_BEFORE_CROP / PAPER_CROP)),
    )
    if official.layout == STAGE1:
        segments = _lookup(config, "data.n_segments_train")
        if segments:
            task["num_segments"] = int(segments)
        task["segment_stride_frames"] = towers.segment_frames
        return fairseq_config(
            "synchformer_segment_clip", "av_sync_pretraining", "segment_infonce", towers.model, task
        )

    positions, sync_dim = _require(state, "sync.pos_embed", path).shape[1:]
    tokens_per_segment = towers.visual_tokens + towers.audio_tokens
    segments = _lookup(config, "data.n_segments")
    if segments is None:
        segments, remainder = divmod(positions - 2, tokens_per_segment)
        if remainder:
            raise ValueError(
                f"{path}: the sync module has {positions} positions, which is not 2 + S x "
                f"{tokens_per_segment} tokens per segment for any S"
            )
    try:
        fit_sync_positions(state, 2 + int(segments) * tokens_per_segment)
    except ValueError as error:
        raise ValueError(f"{path}: {error} (the config says data.n_segments={segments})") from None
    step = _lookup(config, "data.step_size_seg") or DEFAULT_SEGMENT_STEP
    offset_head = "sync.offset_head.weight" in state
    task.update(
        _data_fields(config), num_segments=int(segments),
        segment_stride_frames=round(towers.segment_frames * step),
        synchronizability=official.layout == SYNCHRONIZABILITY,
    )
    if offset_head:
        task["num_offset_classes"] = state["sync.offset_head.weight"].shape[0]
    recorded_sync_heads = _lookup(config, "model.params.transformer.params.n_head")
    _check_mlp(state, "sync.blocks.0.mlp.fc1.weight", sync_dim, path)
    model = dict(
        towers.model, sync_dim=sync_dim, sync_depth=_depth(state, "sync.blocks."),
        sync_heads=_heads("sync", sync_dim, recorded_sync_heads, heads.get("sync"), path),
        offset_head=offset_head, sync_head="sync.sync_head.weight" in state,
    )
    return fairseq_config("synchformer", "av_sync", "av_sync_offset", model, task)


@dataclass
class ConversionSummary:
    layout: str
    model: str
    task: str
    out_path: str
    num_tensors: int


def convert_synchformer(
    official_path: str, out_path: str, heads: Optional[Mapping[str, Optional[int]]] = None
) -> ConversionSummary:
    """Read an official Synchformer checkpoint safely, check that our model loads its weights
    strictly, and write the fairseq checkpoint atomically to ``out_path``.

    Raises:
        FileNotFoundError, ValueError: a missing file, a refused pickle, another layout, or sizes
            our models cannot take (the message names the file and what to do).
    """
    official = load_official_checkpoint(official_path)
    cfg = synchformer_config(official, str(official_path), heads)
    structured = OmegaConf.create(cfg)
    # built without memory or initialisation (minutes for the paper's 237 M parameters on a CPU):
    # it only checks that the weights fit, then hands them on as its state dict
    try:
        with torch.device("meta"):
            model = models.build_model(structured.model, tasks.setup_task(structured.task), from_checkpoint=True)
    except ValueError as error:  # sizes our model refuses
        raise ValueError(f"{official_path}: {error}") from None
    # our fairseq models hold the SynchformerNet as ``net``; stage 1's temperature sits beside it
    own_keys = set(model.state_dict())
    weights = {key if key in own_keys else f"net.{key}": value for key, value in official.state_dict.items()}
    missing, unexpected = torch.nn.Module.load_state_dict(model, weights, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(
            f"{official_path}: the weights do not fit the inferred {cfg['model']['_name']} model "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); was it trained with another "
            "architecture?"
        )
    save_checkpoint(fairseq_checkpoint(cfg, model.state_dict()), out_path)
    return ConversionSummary(
        official.layout, cfg["model"]["_name"], cfg["task"]["_name"], os.path.abspath(out_path),
        len(official.state_dict),
    )


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="avplugins-convert",
        description="Import another project's checkpoint as a fairseq checkpoint of avplugins.",
    )
    systems = parser.add_subparsers(dest="system", required=True)
    synchformer = systems.add_parser(
        "synchformer", help="an official Synchformer checkpoint (stage 1, stage 2 or synchronizability)"
    )
    synchformer.add_argument("official", help="the official .pt file (read without executing pickled code)")
    synchformer.add_argument("out", help="where to write the fairseq checkpoint")
    for tower in PAPER_HEADS:
        synchformer.add_argument(
            f"--{tower}-heads", type=int, default=None,
            help=f"attention heads of the {tower} transformer when neither the file nor the paper says",
        )
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    heads = {tower: getattr(args, f"{tower}_heads") for tower in PAPER_HEADS}
    try:
        summary = convert_synchformer(args.official, args.out, heads)
    except (OSError, ValueError) as error:
        print(f"avplugins-convert: error: {error}", file=sys.stderr)
        return 2
    print(
        f"{args.official}: official {summary.layout} checkpoint -> {summary.out_path} "
        f"(model {summary.model}, task {summary.task}, {summary.num_tensors} tensors)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
