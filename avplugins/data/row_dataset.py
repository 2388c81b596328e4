"""Base of the datasets that make one item per manifest row, drawn anew each training epoch."""
from fairseq.data import FairseqDataset

from avplugins.data.invalid_items import SkipsInvalidItems


class ManifestRowDataset(SkipsInvalidItems, FairseqDataset):
    """One item per kept manifest row (``entries``), rows that fail to load skipped as
    :class:`SkipsInvalidItems` says. Training items draw their windows, crops and offsets from
    generators seeded with the epoch, so fairseq must tell the dataset each epoch
    (:meth:`set_epoch`) and may not reuse one epoch's batch iterator for the next."""

    epoch = 1  # until fairseq calls set_epoch (its epochs count from 1)

    def __len__(self) -> int:
        return len(self.entries)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def can_reuse_epoch_itr_across_epochs(self) -> bool:
        return False
