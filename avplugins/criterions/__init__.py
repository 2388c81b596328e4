"""fairseq criterions; importing this package registers them all."""
from avplugins._imports import import_submodules

import_submodules(__name__, __file__)
