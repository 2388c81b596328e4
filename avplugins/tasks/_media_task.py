"""What all tasks of this plugin share: media inputs, no input dictionary, no length limit."""
from fairseq.tasks import FairseqTask


class MediaTaskBase(FairseqTask):
    """A task over decoded audio/video whose training split is ``cfg.train_subset``. Inputs are
    not tokens (no dictionary, no position limit); a task with token targets overrides
    :attr:`target_dictionary`."""

    def is_train_split(self, split: str) -> bool:
        return split == self.cfg.train_subset

    def max_positions(self):
        return None

    @property
    def source_dictionary(self):
        return None

    @property
    def target_dictionary(self):
        return None
