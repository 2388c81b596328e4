"""Synchformer stage 2 loss: offset cross-entropy (+ synchronizability) with accuracy metrics.

Logged (validation numbers are exact over the whole set, summed across batches and workers):
``loss`` (nats per clip; chance for 21 classes is ln 21 = 3.04), ``accuracy_1``,
``accuracy_1_tol`` (within +-1 class, i.e. +-0.2 s), ``accuracy_5``, and with a
synchronizability head ``sync_accuracy`` and ``sync_roc_auc`` (from score histograms with
``SYNC_SCORE_BINS`` bins, exact up to ties inside a bin).
"""
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass
from fairseq.logging import metrics

SYNC_SCORE_BINS = 1000


@dataclass
class AVSyncOffsetCriterionConfig(FairseqDataclass):
    sync_loss_weight: float = field(
        default=1.0, metadata={"help": "weight of the synchronizability cross-entropy"}
    )


def offset_hits(offset_logits: torch.Tensor, target: torch.Tensor) -> dict:
    """Counts of correct predictions: top-1, top-1 within +-1 class, top-5.

    Args:
        offset_logits: (B, C); target: (B,) class indices.
    """
    predicted = offset_logits.argmax(dim=-1)
    top5 = offset_logits.topk(min(5, offset_logits.shape[-1]), dim=-1).indices
    return {
        "correct_1": int((predicted == target).sum()),
        "correct_1_tol": int(((predicted - target).abs() <= 1).sum()),
        "correct_5": int((top5 == target[:, None]).any(dim=-1).sum()),
    }


def score_histograms(positive_scores: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """(2, SYNC_SCORE_BINS) counts of scores in [0, 1] for label 0 (row 0) and label 1 (row 1)."""
    bins = (positive_scores.clamp(0, 1) * SYNC_SCORE_BINS).long().clamp(max=SYNC_SCORE_BINS - 1)
    histograms = torch.zeros(2, SYNC_SCORE_BINS, dtype=torch.long)
    histograms.index_put_((labels.long().cpu(), bins.cpu()), torch.ones_like(bins.cpu()), accumulate=True)
    return histograms.numpy()


def roc_auc_from_histograms(histograms: np.ndarray) -> float:
    """ROC-AUC (probability that a positive scores above a negative, ties count half) from
    per-bin counts of negatives (row 0) and positives (row 1); NaN when a class is absent."""
    histograms = np.asarray(histograms, dtype=np.float64)  # summed across workers as a tensor
    negatives, positives = histograms[0], histograms[1]
    if negatives.sum() == 0 or positives.sum() == 0:
        return float("nan")
    negatives_below = np.cumsum(negatives) - negatives
    wins = (positives * (negatives_below + 0.5 * negatives)).sum()
    return float(wins / (negatives.sum() * positives.sum()))


@register_criterion("av_sync_offset", dataclass=AVSyncOffsetCriterionConfig)
class AVSyncOffsetCriterion(FairseqCriterion):
    def __init__(self, task, sync_loss_weight: float = 1.0):
        super().__init__(task)
        self.sync_loss_weight = sync_loss_weight

    def forward(self, model, sample, reduce=True):
        output = model(**sample["net_input"])
        batch_size = sample["target"].numel()
        loss = torch.zeros((), device=sample["target"].device)
        logging_output = {"nsentences": batch_size, "sample_size": batch_size}
        sync_target = sample["sync_target"]
        if "offset_logits" in output:
            # offsets of unsynchronizable clips (+-crop length) are not on the grid: no offset loss
            synchronizable = sync_target.bool()
            offset_logits = output["offset_logits"][synchronizable].float()
            target = sample["target"][synchronizable]
            offset_loss = F.cross_entropy(offset_logits, target, reduction="sum")
            loss = loss + offset_loss
            logging_output.update(offset_hits(offset_logits.detach(), target))
            logging_output["offset_loss"] = offset_loss.item()
            logging_output["num_offsets"] = int(synchronizable.sum())
        if "sync_logits" in output:
            sync_logits = output["sync_logits"].float()
            sync_loss = F.cross_entropy(sync_logits, sync_target, reduction="sum")
            loss = loss + self.sync_loss_weight * sync_loss
            logging_output["sync_loss"] = sync_loss.item()
            logging_output["sync_correct"] = int((sync_logits.argmax(-1) == sync_target).sum())
            positive_scores = sync_logits.detach().softmax(-1)[:, 1]
            logging_output["_sync_histograms"] = score_histograms(positive_scores, sync_target)
        logging_output["loss"] = loss.item()
        return loss, batch_size, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        def total(key):
            return sum(log.get(key, 0) for log in logging_outputs)

        sample_size = total("sample_size")
        metrics.log_scalar("loss", total("loss") / max(sample_size, 1), sample_size, round=4)
        num_offsets = total("num_offsets")
        if num_offsets:
            metrics.log_scalar("offset_loss", total("offset_loss") / num_offsets, num_offsets, round=4)
            for name in ("correct_1", "correct_1_tol", "correct_5"):
                metrics.log_scalar_sum("_" + name, total(name))
            metrics.log_scalar_sum("_num_offsets", num_offsets)
            for name in ("1", "1_tol", "5"):
                metrics.log_derived(
                    f"accuracy_{name}",
                    lambda meters, name=name: round(
                        meters[f"_correct_{name}"].sum / meters["_num_offsets"].sum, 4
                    ),
                )
        if any("sync_loss" in log for log in logging_outputs):
            metrics.log_scalar("sync_loss", total("sync_loss") / sample_size, sample_size, round=4)
            metrics.log_scalar_sum("_sync_correct", total("sync_correct"))
            metrics.log_scalar_sum("_sync_count", sample_size)
            metrics.log_scalar_sum("_sync_histograms", total("_sync_histograms"))
            metrics.log_derived(
                "sync_accuracy",
                lambda meters: round(meters["_sync_correct"].sum / meters["_sync_count"].sum, 4),
            )
            metrics.log_derived(
                "sync_roc_auc", lambda meters: round(roc_auc_from_histograms(meters["_sync_histograms"].sum), 4)
            )

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
