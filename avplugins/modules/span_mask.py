"""Span masking of the fused features (wav2vec 2.0 / data2vec / AV-data2vec).

``mask_prob`` follows fairseq's ``compute_mask_indices`` convention, which the papers
describe as "each time step starts a span with probability p": a sequence of L valid steps
gets ``int(mask_prob * L / span_length + U)`` spans (U ~ Uniform[0, 1) rounds the count
probabilistically), whose starts are drawn WITHOUT replacement. So ``mask_prob`` is the
fraction of steps that would be masked if spans never overlapped; overlaps make the actual
fraction smaller (about 0.4 for mask_prob 0.5, span 10). A literal per-step start rate of 0.5
with spans of 10 would mask 99.9 % of the input, which is not what the papers train with.

Differences to fairseq, by design:
- Every span lies inside the valid part, and every valid step can be masked (fairseq draws
  starts from the first ``L - span_length`` steps, so its last valid step is never masked).
- A sequence is never masked entirely: at most ``(L - 1) // span_length`` spans, so
  sequences of at most ``span_length`` valid steps stay unmasked (fairseq raises an error).
- Each sequence keeps its own number of masked steps (fairseq's ``require_same_masks``
  trims all rows to the smallest count; the losses here select masked steps by boolean
  indexing and do not need equal counts).
- Pure torch and vectorised over the batch; a ``torch.Generator`` makes draws reproducible.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def check_padding_mask(padding_mask: Optional[torch.Tensor], batch: int, steps: int) -> None:
    """Raise unless ``padding_mask`` is None or a (batch, steps) bool tensor."""
    if padding_mask is not None and (
        padding_mask.dtype != torch.bool or padding_mask.shape != (batch, steps)
    ):
        raise ValueError(
            f"padding_mask must be a ({batch}, {steps}) bool tensor (True at padding), "
            f"got {padding_mask.dtype} {tuple(padding_mask.shape)}"
        )


def _valid_lengths(
    batch_size: int, num_steps: int, padding_mask: Optional[torch.Tensor]
) -> torch.Tensor:
    """(B,) number of non-padding steps; padding_mask is (B, T) bool, True at padding."""
    check_padding_mask(padding_mask, batch_size, num_steps)
    if padding_mask is None:
        return torch.full((batch_size,), num_steps, dtype=torch.long)
    return (~padding_mask).sum(dim=1)


def compute_span_mask(
    batch_size: int,
    num_steps: int,
    mask_prob: float = 0.5,
    span_length: int = 10,
    padding_mask: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    min_masks: int = 2,
) -> torch.Tensor:
    """Random spans of ``span_length`` masked steps per sequence.

    Args:
        batch_size, num_steps: B and T of the (B, T) mask.
        mask_prob: fairseq's span-start rate (see the module docstring): the number of spans
            of a sequence with L valid steps is ``int(mask_prob * L / span_length + U)``.
        span_length: steps per span.
        padding_mask: optional (B, T) bool, True at padding; padding is never masked and
            only the valid steps count for L. Padding must be at the end of each row
            (valid steps are taken as ``0 .. L-1``).
        generator: torch random generator (on the device of ``padding_mask``, CPU otherwise).
        min_masks: at least this many spans per sequence (2, as wav2vec2 / data2vec /
            AV-HuBERT), unless the sequence is too short (see the module docstring).
    Returns:
        (B, T) bool, True at masked steps, on the device of ``padding_mask`` (CPU otherwise).
    """
    if mask_prob < 0:
        raise ValueError(f"mask_prob must be >= 0, got {mask_prob}")
    if span_length < 1:
        raise ValueError(f"span_length must be >= 1, got {span_length}")
    if min_masks < 0:
        raise ValueError(f"min_masks must be >= 0, got {min_masks}")
    device = padding_mask.device if padding_mask is not None else torch.device("cpu")
    lengths = _valid_lengths(batch_size, num_steps, padding_mask).to(device)

    rounding = torch.rand(batch_size, generator=generator, device=device)
    num_spans = torch.floor(mask_prob * lengths / span_length + rounding).long()
    max_spans = (lengths - 1).clamp(min=0) // span_length  # never cover a whole sequence
    num_spans = num_spans.clamp(min=min_masks).minimum(max_spans)

    # Sampling starts without replacement = taking the num_spans smallest random keys among
    # the L - span_length + 1 positions where a whole span fits.
    steps = torch.arange(num_steps, device=device)
    num_candidates = lengths - span_length + 1
    keys = torch.rand(batch_size, num_steps, generator=generator, device=device)
    keys = keys.masked_fill(steps[None, :] >= num_candidates[:, None], float("inf"))
    ranks = keys.argsort(dim=1).argsort(dim=1)
    starts = ranks < num_spans[:, None]

    # Step t is masked when a span starts in (t - span_length, t].
    started = starts.long().cumsum(dim=1)
    started_before_window = F.pad(started, (span_length, 0))[:, :num_steps]
    return started > started_before_window


class MaskEmbedding(nn.Module):
    """A learned vector that replaces the features of masked steps.

    Initialised uniformly in [0, 1) like wav2vec2 / AV-HuBERT's ``mask_emb`` (which maps to
    ``embedding`` here).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(dim).uniform_())

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, D), mask (B, T) bool -> (B, T, D) with masked steps replaced."""
        return torch.where(mask[..., None], self.embedding.to(x.dtype), x)
