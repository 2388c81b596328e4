"""avplugins: a fairseq plugin for Synchformer and AV-data2vec.

Importing this package registers every task, model and criterion with fairseq, so its
directory works as ``--user-dir`` / ``common.user_dir``.
"""
from avplugins import criterions, models, tasks  # noqa: F401  (registration side effects)

__version__ = "0.1.0"
