"""Helper for the registry packages (tasks, models, criterions)."""
import importlib
import pathlib


def import_submodules(package_name: str, package_file: str) -> None:
    """Import every public ``*.py`` beside ``package_file`` so their fairseq
    ``register_*`` decorators run when the package is imported."""
    for module_file in sorted(pathlib.Path(package_file).parent.glob("*.py")):
        if not module_file.name.startswith("_"):
            importlib.import_module(f"{package_name}.{module_file.stem}")
