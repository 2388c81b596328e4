"""``avplugins-train``: ``fairseq-hydra-train`` with the same arguments, for this plugin.

Before fairseq starts it imports ``avplugins`` (registering our tasks, models, criteria), which
applies :func:`avplugins.distributed.apply_fairseq_fixes`, so that data-parallel training also
works on CPUs: spawned by fairseq (``distributed_training.distributed_world_size=N``), under
``torchrun`` or under SLURM (see notes in the README). ``common.user_dir`` defaults to this
plugin's directory when the command line does not set it.
"""
import os
import sys
from typing import List, Optional


def with_user_dir(argv: List[str], user_dir: str) -> List[str]:
    """``argv`` (Hydra overrides) plus ``common.user_dir=<user_dir>`` unless it sets that key."""
    sets_user_dir = any(arg.lstrip("+").startswith("common.user_dir=") for arg in argv)
    return list(argv) if sets_user_dir else [*argv, f"common.user_dir={user_dir}"]


def main(argv: Optional[List[str]] = None) -> None:
    import avplugins  # applies the fixes, the launcher's included, before fairseq_cli runs
    from fairseq_cli import hydra_train

    user_dir = os.path.dirname(os.path.abspath(avplugins.__file__))
    arguments = sys.argv[1:] if argv is None else argv
    # Hydra reads the command line from sys.argv
    sys.argv = [sys.argv[0], *with_user_dir(arguments, user_dir)]
    hydra_train.cli_main()


if __name__ == "__main__":
    main()
