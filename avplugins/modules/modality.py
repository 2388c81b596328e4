"""Which input streams each sample gets: audio+video, audio only, or video only.

AV-data2vec draws per sample: both streams with probability p_AV; otherwise audio only with
probability p_A|not-AV, else video only. Both probabilities move linearly from their start to
their end values over ``num_updates`` updates and stay at the end values afterwards. Student
and teacher use separate schedulers.
"""
from typing import Optional, Tuple

import torch


def _check_probability(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
    return float(value)


class ModalityScheduler:
    """Linearly scheduled modality probabilities.

    Args:
        p_av_start, p_av_end: probability that a sample has both streams, at update 0 and
            from update ``num_updates`` on.
        p_audio_given_not_av_start, p_audio_given_not_av_end: probability of audio only
            among the samples that do not get both streams (the rest get video only).
        num_updates: length of the linear ramp in updates (0: the end values from the start).
    """

    def __init__(
        self,
        p_av_start: float,
        p_av_end: float,
        p_audio_given_not_av_start: float,
        p_audio_given_not_av_end: float,
        num_updates: int,
    ):
        self.p_av_start = _check_probability("p_av_start", p_av_start)
        self.p_av_end = _check_probability("p_av_end", p_av_end)
        self.p_audio_given_not_av_start = _check_probability(
            "p_audio_given_not_av_start", p_audio_given_not_av_start
        )
        self.p_audio_given_not_av_end = _check_probability(
            "p_audio_given_not_av_end", p_audio_given_not_av_end
        )
        if num_updates < 0:
            raise ValueError(f"num_updates must be >= 0, got {num_updates}")
        self.num_updates = num_updates

    def _progress(self, update: int) -> float:
        """Fraction of the ramp done at ``update``, in [0, 1]."""
        if update < 0:
            raise ValueError(f"update must be >= 0, got {update}")
        if self.num_updates == 0:
            return 1.0
        return min(update / self.num_updates, 1.0)

    def probabilities(self, update: int) -> Tuple[float, float, float]:
        """(p_av, p_audio_only, p_video_only) at ``update``; they sum to 1."""
        progress = self._progress(update)
        p_av = self.p_av_start + progress * (self.p_av_end - self.p_av_start)
        p_audio = self.p_audio_given_not_av_start + progress * (
            self.p_audio_given_not_av_end - self.p_audio_given_not_av_start
        )
        return p_av, (1.0 - p_av) * p_audio, (1.0 - p_av) * (1.0 - p_audio)

    def sample(
        self, batch_size: int, update: int, generator: Optional[torch.Generator] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Draw the streams of ``batch_size`` samples at ``update``.

        Returns:
            (use_audio, use_video): two (B,) bool tensors on the CPU (or the generator's
            device); at least one of them is True for every sample.
        """
        p_av, p_audio_only, _ = self.probabilities(update)
        device = generator.device if generator is not None else torch.device("cpu")
        draw = torch.rand(batch_size, generator=generator, device=device)
        # One uniform draw split into three intervals: [0, p_av) both, then audio only.
        both = draw < p_av
        audio_only = ~both & (draw < p_av + p_audio_only)
        video_only = ~both & ~audio_only
        return both | audio_only, both | video_only
