"""AV-data2vec's loss: regression of the teacher's contextualised targets.

``loss = scale * sum over loss positions of sum over D channels of l(prediction - target)``
with ``l`` the squared error (``loss_beta = 0``) or smooth-L1 with ``beta = loss_beta``, and
``scale = 1 / sqrt(D)`` unless ``loss_scale`` is given (data2vec's convention). The sample
size is the number of loss positions, so the logged ``loss`` is per position.

Logged: ``loss``, ``ema_decay`` (6 decimals: 0.999 .. 0.9999), ``target_var`` and ``pred_var``
(data2vec's mean per-channel standard deviation of targets / predictions).
A target (or prediction) spread below ``min_target_var`` (``min_pred_var``) after
``collapse_check_after_updates`` updates means the representations collapsed; training stops
with :class:`RepresentationCollapseError` (fairseq saves ``crash.pt`` first).
"""
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass
from fairseq.logging import metrics

MEAN_LOGGED_KEYS = ("ema_decay", "target_var", "pred_var")


class RepresentationCollapseError(Exception):
    """The teacher's targets (or the student's predictions) no longer vary: training is lost."""


@dataclass
class AVData2VecRegressionConfig(FairseqDataclass):
    loss_beta: float = field(default=0.0, metadata={"help": "smooth-L1 beta; 0 = squared error (L2)"})
    loss_scale: Optional[float] = field(
        default=None, metadata={"help": "loss multiplier; default 1/sqrt(D)"}
    )
    min_target_var: float = field(
        default=0.1, metadata={"help": "stop when target_var falls below this (collapse); 0 disables"}
    )
    min_pred_var: float = field(
        default=0.01, metadata={"help": "stop when pred_var falls below this; 0 disables"}
    )
    collapse_check_after_updates: int = field(
        default=5000, metadata={"help": "check target_var / pred_var only from this update on"}
    )


def regression_loss(
    predictions: torch.Tensor, targets: torch.Tensor, beta: float, scale: Optional[float]
) -> torch.Tensor:
    """Summed regression loss (scalar float32) of (N, D) predictions against (N, D) targets."""
    predictions, targets = predictions.float(), targets.float()
    if beta == 0:
        per_position = F.mse_loss(predictions, targets, reduction="none").sum(dim=-1)
    else:
        per_position = F.smooth_l1_loss(predictions, targets, reduction="none", beta=beta).sum(dim=-1)
    if scale is None:
        scale = 1.0 / math.sqrt(predictions.shape[-1])
    return per_position.sum() * scale


def check_collapse(name: str, value: float, threshold: float, num_updates: int) -> None:
    """Raise :class:`RepresentationCollapseError` when ``value`` < ``threshold`` (not for NaN)."""
    if threshold > 0 and value < threshold:
        raise RepresentationCollapseError(
            f"{name} = {value:.4g} < criterion.min_{name} = {threshold} at update {num_updates}: "
            "the representations have collapsed (every step looks alike). Restart from an "
            "earlier checkpoint with a lower learning rate or a longer warm-up, or a higher "
            f"model.ema_decay; set criterion.min_{name}=0 to train on regardless."
        )


@register_criterion("av_data2vec_regression", dataclass=AVData2VecRegressionConfig)
class AVData2VecRegressionCriterion(FairseqCriterion):
    def __init__(self, task, cfg: AVData2VecRegressionConfig):
        super().__init__(task)
        self.cfg = cfg

    def forward(self, model, sample, reduce=True):
        output = model(**sample["net_input"])
        loss = regression_loss(output["predictions"], output["targets"], self.cfg.loss_beta, self.cfg.loss_scale)
        target_var, pred_var = float(output["target_var"]), float(output["pred_var"])
        if model.training and output["num_updates"] >= self.cfg.collapse_check_after_updates:
            check_collapse("target_var", target_var, self.cfg.min_target_var, output["num_updates"])
            check_collapse("pred_var", pred_var, self.cfg.min_pred_var, output["num_updates"])
        sample_size = output["num_positions"]
        logging_output = {
            "loss": loss.item(),
            "sample_size": sample_size,
            "nsentences": sample["nsentences"],
            "ntokens": sample["ntokens"],
            "ema_decay": output["ema_decay"],
            "target_var": target_var,
            "pred_var": pred_var,
        }
        return loss, sample_size, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        loss_sum = sum(log.get("loss", 0.0) for log in logging_outputs)
        metrics.log_scalar("loss", loss_sum / max(sample_size, 1), sample_size, round=4)
        for key in MEAN_LOGGED_KEYS:
            values = [log[key] for log in logging_outputs if key in log and not math.isnan(log[key])]
            if values:
                metrics.log_scalar(key, sum(values) / len(values), len(values), round=6)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return False
