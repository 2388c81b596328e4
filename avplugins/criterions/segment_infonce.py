"""Synchformer stage 1 loss: symmetric segment-level InfoNCE.

Every (clip, segment) pair of the batch is one row of the (B*S) x (B*S) similarity matrix; the
positive of a video segment is the audio of the same clip AND the same segment index, and every
other segment, including other segments of the same clip, is a negative (this is what makes the
towers learn temporal alignment). The loss is summed over rows and both directions are averaged,
so ``sample_size = B * S`` and data-parallel gradients equal those of one large batch when
``gather_negatives`` is on. Logged: ``loss`` (nats per row), ``accuracy_v2a`` / ``accuracy_a2v``
(the positive ranks first among the candidates), ``accuracy`` (their mean) and ``temperature``.
"""
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass
from fairseq.logging import metrics


@dataclass
class SegmentInfoNCECriterionConfig(FairseqDataclass):
    gather_negatives: bool = field(
        default=False,
        metadata={"help": "use the segments of every data-parallel worker as negatives "
                  "(the official code uses only the local batch)"},
    )


def gather_with_grad(embeddings: torch.Tensor) -> torch.Tensor:
    """Concatenate (N, D) from every worker along dim 0, keeping gradients to every copy."""
    import torch.distributed.nn  # noqa: F401  (registers the differentiable collectives)

    return torch.cat(torch.distributed.nn.all_gather(embeddings), dim=0)


def segment_infonce(
    video_embeddings: torch.Tensor,
    audio_embeddings: torch.Tensor,
    temperature: torch.Tensor,
    all_video_embeddings: torch.Tensor = None,
    all_audio_embeddings: torch.Tensor = None,
    first_positive: int = 0,
):
    """Symmetric InfoNCE summed over rows.

    Args:
        video_embeddings, audio_embeddings: (N, D) L2-normalised local rows (N = B * S).
        temperature: scalar tau.
        all_*_embeddings: (M, D) candidates (the gathered batch); default: the local rows.
        first_positive: column of the first local row's positive inside the candidates.
    Returns:
        (loss summed over the N rows, v->a correct count, a->v correct count)
    """
    if all_video_embeddings is None:
        all_video_embeddings, all_audio_embeddings = video_embeddings, audio_embeddings
    targets = first_positive + torch.arange(video_embeddings.shape[0], device=video_embeddings.device)
    video_to_audio = video_embeddings @ all_audio_embeddings.T / temperature
    audio_to_video = audio_embeddings @ all_video_embeddings.T / temperature
    loss = 0.5 * (
        F.cross_entropy(video_to_audio.float(), targets, reduction="sum")
        + F.cross_entropy(audio_to_video.float(), targets, reduction="sum")
    )
    correct_v2a = int((video_to_audio.argmax(-1) == targets).sum())
    correct_a2v = int((audio_to_video.argmax(-1) == targets).sum())
    return loss, correct_v2a, correct_a2v


@register_criterion("segment_infonce", dataclass=SegmentInfoNCECriterionConfig)
class SegmentInfoNCECriterion(FairseqCriterion):
    def __init__(self, task, gather_negatives: bool = False):
        super().__init__(task)
        self.gather_negatives = gather_negatives

    def forward(self, model, sample, reduce=True):
        output = model(**sample["net_input"])
        video = output["video_embeddings"].flatten(0, 1)  # (B*S, D)
        audio = output["audio_embeddings"].flatten(0, 1)
        temperature = output["temperature"]
        if self.gather_negatives and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            loss, correct_v2a, correct_a2v = segment_infonce(
                video, audio, temperature, gather_with_grad(video), gather_with_grad(audio),
                first_positive=dist.get_rank() * video.shape[0],
            )
        else:
            loss, correct_v2a, correct_a2v = segment_infonce(video, audio, temperature)
        num_rows = video.shape[0]
        logging_output = {
            "loss": loss.item(),
            "nsentences": sample["nsentences"],
            "sample_size": num_rows,
            "correct_v2a": correct_v2a,
            "correct_a2v": correct_a2v,
            "temperature": float(temperature),
            "num_workers_logged": 1,
        }
        return loss, num_rows, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        def total(key):
            return sum(log.get(key, 0) for log in logging_outputs)

        num_rows = total("sample_size")
        metrics.log_scalar("loss", total("loss") / max(num_rows, 1), num_rows, round=4)
        metrics.log_scalar("accuracy_v2a", total("correct_v2a") / max(num_rows, 1), num_rows, round=4)
        metrics.log_scalar("accuracy_a2v", total("correct_a2v") / max(num_rows, 1), num_rows, round=4)
        # segment retrieval precision@1 of both directions (the official stage 1's early-stop metric)
        metrics.log_scalar(
            "accuracy", (total("correct_v2a") + total("correct_a2v")) / max(2 * num_rows, 1), num_rows, round=4
        )
        metrics.log_scalar("temperature", total("temperature") / max(total("num_workers_logged"), 1), round=4)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
