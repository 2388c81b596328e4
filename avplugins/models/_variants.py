"""Named size variants (``<model>_tiny``, ``<model>_large``) that work with Hydra and argparse.

fairseq applies ``register_model_architecture`` functions only to argparse-era configs; a
Hydra config naming ``model._name: <model>_tiny`` needs a registered dataclass of that name.
:func:`register_variant` registers one: a subclass of the model's dataclass whose defaults are
the variant's sizes, so ``model._name`` and ``--arch`` both select it and every field can still
be overridden.
"""
import dataclasses
from typing import Any, Dict

from fairseq.models import MODEL_DATACLASS_REGISTRY, register_model


def register_variant(model_cls: type, model_name: str, variant: str, defaults: Dict[str, Any]) -> type:
    """Register ``{model_name}_{variant}`` with ``defaults`` replacing the base dataclass's.

    Returns the variant's dataclass.
    """
    base_config = MODEL_DATACLASS_REGISTRY[model_name]
    base_fields = {f.name: f for f in dataclasses.fields(base_config)}
    unknown = sorted(set(defaults) - set(base_fields))
    if unknown:
        raise KeyError(f"{model_name}_{variant}: {unknown} are not fields of {base_config.__name__}")
    new_fields = [
        (name, base_fields[name].type, dataclasses.field(default=value, metadata=base_fields[name].metadata))
        for name, value in defaults.items()
    ]
    suffix = "".join(part.title() for part in variant.split("_"))
    config_cls = dataclasses.make_dataclass(f"{base_config.__name__}{suffix}", new_fields, bases=(base_config,))
    config_cls.__module__ = model_cls.__module__
    variant_cls = type(f"{model_cls.__name__}{suffix}", (model_cls,), {"__module__": model_cls.__module__})
    register_model(f"{model_name}_{variant}", dataclass=config_cls)(variant_cls)
    return config_cls
