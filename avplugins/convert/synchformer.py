"""Import official Synchformer checkpoints (github v-iashin/Synchformer) into our modules.

Two steps: :func:`load_official_checkpoint` reads the file without executing pickled code
(``torch.load(weights_only=True)`` with an explicit allow-list for the OmegaConf config the
official trainer pickles beside the weights) and recognises its layout;
:func:`checkpoint_filter_fn` renames the official keys to those of
:class:`avplugins.modules.synchformer_net.SynchformerNet` (``visual.*``, ``audio.*``,
``vproj``, ``aproj``, ``sync.*``) and fuses separate query/key/value projections into our
``qkv``. Stage-1 files map to the towers plus ``temperature`` (official ``logit_scale``,
which holds the InfoNCE temperature itself, not a log-scale), the name our stage-1 model uses.
"""
import collections
import pickle
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

STAGE1 = "stage1"
SYNC = "sync"
SYNCHRONIZABILITY = "synchability"

_DDP_PREFIX = "module."
_QKV_ORDER = ("query", "key", "value")

# (official key regex, our key template or None to drop); a named group ``part`` marks one
# of separate query / key / value projections that are fused into our ``qkv``.
Rule = Tuple[str, Optional[str]]


def _aggregator_rules(official: str, ours: str) -> List[Rule]:
    """Rules for a CLS aggregation layer (official: ``nn.TransformerEncoderLayer``)."""
    return [
        (rf"{official}\.cls_token", f"{ours}.cls_token"),
        (rf"{official}\.self_attn\.in_proj_(weight|bias)", rf"{ours}.block.attn.qkv.\1"),
        (rf"{official}\.self_attn\.out_proj\.(weight|bias)", rf"{ours}.block.attn.proj.\1"),
        (rf"{official}\.linear([12])\.(weight|bias)", rf"{ours}.block.mlp.fc\1.\2"),
        (rf"{official}\.norm([12])\.(weight|bias)", rf"{ours}.block.norm\1.\2"),
    ]


_VISUAL_RULES: List[Rule] = [
    # the 2-D patch embedding is built officially but unused (tubelets go through patch_embed_3d)
    (r"patch_embed\.proj\.(weight|bias)", None),
    (r"patch_embed_3d\.proj\.(weight|bias)", r"patch_embed.\1"),
    (r"(cls_token|pos_embed|temp_embed)", r"\1"),
    (r"blocks\.(\d+)\.norm3\.(weight|bias)", r"blocks.\1.time_norm.\2"),
    (r"blocks\.(\d+)\.timeattn\.(qkv|proj)\.(weight|bias)", r"blocks.\1.time_attn.\2.\3"),
    (
        r"blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)",
        r"blocks.\1.\2.\3",
    ),
    (r"norm\.(weight|bias)", r"norm.\1"),
    *_aggregator_rules("spatial_attn_agg", "spatial_agg"),
]

_AST_LAYER = r"ast\.encoder\.layer\.(\d+)\."
_AUDIO_RULES: List[Rule] = [
    (r"ast\.embeddings\.cls_token", "cls_token"),
    (r"ast\.embeddings\.distillation_token", "dist_token"),
    (r"ast\.embeddings\.position_embeddings", "pos_embed"),
    (r"ast\.embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.\1"),
    (
        _AST_LAYER + r"attention\.attention\.(?P<part>query|key|value)\.(weight|bias)",
        r"blocks.\1.attn.qkv.\3",
    ),
    (_AST_LAYER + r"attention\.output\.dense\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (_AST_LAYER + r"intermediate\.dense\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (_AST_LAYER + r"output\.dense\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (_AST_LAYER + r"layernorm_before\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (_AST_LAYER + r"layernorm_after\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"ast\.layernorm\.(weight|bias)", r"norm.\1"),
    *_aggregator_rules("freq_attn_agg", "freq_agg"),
]

_SYNC_RULES: List[Rule] = [
    (r"OFF_tok", "off_token"),
    (r"MOD_tok", "mod_token"),
    (r"vis_in_lnorm\.(weight|bias)", r"visual_norm.\1"),
    (r"aud_in_lnorm\.(weight|bias)", r"audio_norm.\1"),
    (r"pos_emb_cfg\.pos_emb", "pos_embed"),
    (r"blocks\.(\d+)\.ln([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (r"blocks\.(\d+)\.attn\.(?P<part>query|key|value)\.(weight|bias)", r"blocks.\1.attn.qkv.\3"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"blocks\.(\d+)\.mlp\.0\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"blocks\.(\d+)\.mlp\.2\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"ln_f\.(weight|bias)", r"norm.\1"),
    (r"off_head\.(weight|bias)", r"offset_head.\1"),
    (r"sync_head\.(weight|bias)", r"sync_head.\1"),
]

_TOP_LEVEL_RULES: List[Rule] = [
    (r"(vproj|aproj)\.(weight|bias)", r"\1.\2"),
    (r"logit_scale", "temperature"),
]

# official first key component -> (our prefix, rules for the rest of the key)
_COMPONENTS: Dict[str, Tuple[str, List[Rule]]] = {
    "vfeat_extractor": ("visual.", _VISUAL_RULES),
    "v_encoder": ("visual.", _VISUAL_RULES),
    "afeat_extractor": ("audio.", _AUDIO_RULES),
    "a_encoder": ("audio.", _AUDIO_RULES),
    "transformer": ("sync.", _SYNC_RULES),
}


def _strip_ddp(key: str) -> str:
    return key[len(_DDP_PREFIX):] if key.startswith(_DDP_PREFIX) else key


def _rename(official_key: str) -> Tuple[Optional[str], Optional[str]]:
    """Official key -> (our key or None if dropped, qkv part name or None)."""
    name = _strip_ddp(official_key)
    component, _, rest = name.partition(".")
    prefix, rules = _COMPONENTS.get(component, ("", _TOP_LEVEL_RULES))
    if not prefix:
        rest = name
    for pattern, template in rules:
        match = re.fullmatch(pattern, rest)
        if match:
            if template is None:
                return None, None
            return prefix + match.expand(template), match.groupdict().get("part")
    raise ValueError(
        f"unrecognised key {official_key!r} in the official Synchformer state dict: it belongs "
        "to no part this importer knows (Motionformer, AST, projections, sync module, stage-1 "
        "logit_scale); was the checkpoint trained with another feature extractor or aggregation?"
    )


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Official Synchformer state dict (stage 2 ``ckpt['model']``, the synchronizability
    variant, or stage 1 ``ckpt['state_dict']``; a ``module.`` prefix is ignored) -> state dict
    of :class:`~avplugins.modules.synchformer_net.SynchformerNet` (stage 1: towers and
    ``temperature``). Separate query/key/value projections are concatenated into ``qkv``.

    Raises:
        ValueError: on a key of an unknown part, a duplicated key or an incomplete q/k/v set.
    """
    ours: Dict[str, torch.Tensor] = {}
    qkv_parts: Dict[str, Dict[str, torch.Tensor]] = collections.defaultdict(dict)
    for official_key, value in state_dict.items():
        key, part = _rename(official_key)
        if key is None:
            continue
        if key in ours or part in qkv_parts.get(key, {}):
            raise ValueError(f"two official keys map to {key!r} (last: {official_key!r})")
        if part is None:
            ours[key] = value
        else:
            qkv_parts[key][part] = value
    for key, parts in qkv_parts.items():
        missing = [name for name in _QKV_ORDER if name not in parts]
        if missing:
            raise ValueError(f"official state dict lacks the {missing} projection(s) of {key!r}")
        ours[key] = torch.cat([parts[name] for name in _QKV_ORDER], dim=0)
    return ours


def fit_sync_positions(
    state_dict: Dict[str, torch.Tensor], num_tokens: int
) -> Dict[str, torch.Tensor]:
    """Trims the sync module's position embedding (our keys) to ``num_tokens`` positions, as
    the official code does when a model for fewer segments (e.g. 13 for synchronizability)
    starts from a 14-segment checkpoint. Returns the same dict, updated in place.

    Raises:
        ValueError: if the checkpoint has fewer positions than ``num_tokens``.
    """
    pos_embed = state_dict["sync.pos_embed"]
    if pos_embed.shape[1] < num_tokens:
        raise ValueError(
            f"the checkpoint's sync module has {pos_embed.shape[1]} positions, fewer than the "
            f"{num_tokens} tokens of the model: build the model for fewer segments"
        )
    state_dict["sync.pos_embed"] = pos_embed[:, :num_tokens]
    return state_dict


@dataclass
class OfficialCheckpoint:
    """An official checkpoint, read safely.

    Attributes:
        layout: ``"stage1"``, ``"sync"`` or ``"synchability"``.
        state_dict: weights under our key names (see :func:`checkpoint_filter_fn`).
        config: the official training config (``args``) as plain dicts/lists, or None.
    """

    layout: str
    state_dict: Dict[str, torch.Tensor]
    config: Optional[Dict[str, Any]]


def _allowed_globals() -> List[Tuple[Any, str]]:
    """Everything beyond tensors and plain containers that official checkpoints pickle, as
    (object, pickled name): the OmegaConf ``args`` object (containers, value nodes, metadata,
    the types it records) and numpy scalars in the saved metrics (``numpy.core`` in files
    written with numpy 1, ``numpy._core`` with numpy 2)."""
    from omegaconf import DictConfig, ListConfig, base, nodes

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy 1
        from numpy.core.multiarray import scalar
    omegaconf_classes = [
        (DictConfig, "omegaconf.dictconfig"), (ListConfig, "omegaconf.listconfig"),
        (base.ContainerMetadata, "omegaconf.base"), (base.Metadata, "omegaconf.base"),
        (nodes.AnyNode, "omegaconf.nodes"), (nodes.StringNode, "omegaconf.nodes"),
        (nodes.IntegerNode, "omegaconf.nodes"), (nodes.FloatNode, "omegaconf.nodes"),
        (nodes.BooleanNode, "omegaconf.nodes"),
    ]
    numpy_dtypes = [type(np.dtype(code)) for code in "?bhilqBHILQefd"]  # bool, ints, floats
    return [
        *((cls, f"{module}.{cls.__name__}") for cls, module in omegaconf_classes),
        *((cls, f"builtins.{cls.__name__}") for cls in (dict, list, int, float, str, bool)),
        (collections.defaultdict, "collections.defaultdict"),
        (typing.Any, "typing.Any"),
        (np.dtype, "numpy.dtype"),
        *((cls, f"numpy.dtypes.{cls.__name__}") for cls in numpy_dtypes),
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
    ]


def _refuse(path: Path, allowed: Sequence[Tuple[Any, str]], error: Exception) -> ValueError:
    """A clear error for a file whose pickle the restricted unpickler refused."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        unknown = sorted(set(found) - {name for _, name in allowed})
    except Exception:  # not a torch zip file
        unknown = []
    what = f"pickles {unknown}" if unknown else f"cannot be read safely ({str(error).strip()})"
    return ValueError(
        f"{path}: refused to load: the file {what}, which an official Synchformer checkpoint "
        "does not contain (it holds tensors, plain containers, numbers, strings, numpy scalars "
        "and an OmegaConf config). Nothing in the file was executed."
    )


def _find_weights(checkpoint: Any, path: Path) -> Tuple[str, Mapping[str, torch.Tensor]]:
    """Recognises an official layout -> (layout, the official state dict)."""
    if isinstance(checkpoint, Mapping):
        model = checkpoint.get("model")
        if isinstance(model, Mapping):
            components = {_strip_ddp(key).split(".")[0] for key in model}
            if {"vfeat_extractor", "afeat_extractor", "transformer"} <= components:
                sync_head = any(_strip_ddp(k).startswith("transformer.sync_head.") for k in model)
                return (SYNCHRONIZABILITY if sync_head else SYNC), model
        weights = checkpoint.get("state_dict")
        if isinstance(weights, Mapping):
            components = {_strip_ddp(key).split(".")[0] for key in weights}
            if {"v_encoder", "a_encoder", "logit_scale"} <= components:
                return STAGE1, weights
    if isinstance(checkpoint, Mapping):
        found = f"top level: {sorted(map(str, checkpoint))}"
    else:
        found = f"a {type(checkpoint).__name__}"
    raise ValueError(
        f"{path}: unrecognised checkpoint layout ({found}). Expected an official "
        "Synchformer stage-2 file ('model' with vfeat_extractor.*, afeat_extractor.*, "
        "transformer.*) or a stage-1 file ('state_dict' with module.v_encoder.*, "
        "module.a_encoder.*, logit_scale)."
    )


def _plain_config(args: Any) -> Optional[Dict[str, Any]]:
    """The official ``args`` (an OmegaConf DictConfig) as plain containers, interpolations
    resolved where they resolve."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(args, DictConfig):
        try:
            return OmegaConf.to_container(args, resolve=True)
        except OmegaConfBaseException:
            return OmegaConf.to_container(args, resolve=False)
    return dict(args) if isinstance(args, Mapping) else None


def load_official_checkpoint(path: Union[str, Path]) -> OfficialCheckpoint:
    """Reads an official Synchformer checkpoint without executing pickled code and converts
    its weights to our key names.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file pickles anything outside the allow-list (nothing is executed),
            or its layout is none of stage 1, stage 2, synchronizability.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no official Synchformer checkpoint at {path}")
    allowed = _allowed_globals()
    try:
        with torch.serialization.safe_globals(allowed):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise _refuse(path, allowed, error) from error
    layout, weights = _find_weights(checkpoint, path)
    return OfficialCheckpoint(
        layout=layout,
        state_dict=checkpoint_filter_fn(weights),
        config=_plain_config(checkpoint.get("args")),
    )
