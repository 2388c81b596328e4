"""avplugins: a fairseq plugin for Synchformer and AV-data2vec.

Importing this package registers every task, model and criterion with fairseq, so its
directory works as ``--user-dir`` / ``common.user_dir``, and applies our fixes to fairseq
(:mod:`avplugins.distributed`).
"""
import logging

# fairseq's wav2vec2_classification module calls logging.basicConfig(level=DEBUG) when imported;
# keep the caller's root logger as it was so that library use is not flooded with debug output.
_root_level, _root_handlers = logging.root.level, list(logging.root.handlers)

from avplugins import criterions, models, tasks  # noqa: E402,F401  (registration side effects)
from avplugins.checkpoint import load_model  # noqa: E402,F401
from avplugins.distributed import apply_fairseq_fixes  # noqa: E402

apply_fairseq_fixes()  # safe checkpoint copies and loads, CPU data parallelism (avplugins.distributed)

logging.root.setLevel(_root_level)
for _handler in list(logging.root.handlers):
    if _handler not in _root_handlers:
        logging.root.removeHandler(_handler)

__version__ = "0.1.0"
