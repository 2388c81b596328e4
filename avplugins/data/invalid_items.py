"""Skipping manifest rows whose media cannot be loaded (``task.skip_invalid``).

A dataset of decoded media rows mixes in :class:`SkipsInvalidItems`. Without skipping, the
first row that fails raises (the error names the file and the problem). With it, each failing
row is recorded once with its reason, logged with the running count of the split's skipped
rows, and never decoded again; evaluation then gets ``None`` for it (the collater drops it),
training gets the next loadable row in size order instead, so that every batch keeps its
size: fairseq cannot train on an empty batch (it substitutes the epoch's first batch, which
may be empty too, and still takes an optimizer step).

The record is per process: with ``dataset.num_workers`` > 0 every loader worker logs the
rows it meets.
"""
import logging
from typing import Dict, List, Optional

import numpy as np

from avplugins.data.manifest import ManifestEntry, ManifestError
from avplugins.data.media import MediaError

logger = logging.getLogger(__name__)

# What a row's item may raise for a reason that lies in the row's data (not in the code).
ITEM_ERRORS = (MediaError, ValueError)
SKIP_HINT = "task.skip_invalid=true skips such rows"


class SkipsInvalidItems:
    """``__getitem__`` with skipping for a dataset that has ``entries`` (list of
    :class:`ManifestEntry`), ``manifest_path``, ``train`` and ``load_item(index) -> dict``;
    call :meth:`init_skipping` in the constructor."""

    entries: List[ManifestEntry]
    manifest_path: str
    train: bool

    def init_skipping(self, skip_invalid: bool, sizes: Optional[np.ndarray] = None) -> None:
        """``sizes`` (N,) orders the replacements of training rows (rows of similar size
        first); None: manifest order."""
        self.skip_invalid = skip_invalid
        self.skip_reasons: Dict[int, str] = {}
        order = np.arange(len(self.entries)) if sizes is None else np.argsort(sizes, kind="stable")
        self._replacement_order = order
        self._rank = np.empty_like(order)
        self._rank[order] = np.arange(len(order))

    @property
    def num_skipped(self) -> int:
        """Distinct rows skipped so far (in this process)."""
        return len(self.skip_reasons)

    def load_item(self, index: int) -> dict:
        raise NotImplementedError

    def _record(self, index: int, error: Exception) -> None:
        entry = self.entries[index]
        self.skip_reasons[index] = str(error)
        logger.warning(
            "skipping %s line %d (%s): %s; %d of %d rows of this manifest skipped so far",
            self.manifest_path, entry.line_number, entry.id, error, self.num_skipped, len(self.entries),
        )

    def _try_load(self, index: int) -> Optional[dict]:
        """The row's item, or None when it fails (recorded) or failed before."""
        if index in self.skip_reasons:
            return None
        try:
            return self.load_item(index)
        except ITEM_ERRORS as error:
            if not self.skip_invalid:
                raise
            self._record(index, error)
            return None

    def __getitem__(self, index: int) -> Optional[dict]:
        item = self._try_load(index)
        if item is not None or not self.train:
            return item
        count = len(self._replacement_order)
        for step in range(1, count):
            item = self._try_load(int(self._replacement_order[(self._rank[index] + step) % count]))
            if item is not None:
                return item
        raise ManifestError(
            f"{self.manifest_path}: none of its {count} rows could be loaded (first problem: "
            f"{next(iter(self.skip_reasons.values()))}); fix the media files or the manifest"
        )
