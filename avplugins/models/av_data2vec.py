"""AV-data2vec pre-training model: a masked audio-visual student regresses the contextualised
representations of an EMA teacher.

Per batch (B utterances, T steps at 25 Hz, width D):
1. The student's modality scheduler picks, per utterance, audio+video, audio only or video
   only; span masks (rate ``mask_prob``, spans of ``mask_length`` steps) replace fused
   features by the learned mask embedding; the backbone encodes them.
2. The teacher, an exponential moving average (fairseq ``EMAModule``) of the student's
   transformer encoder, encodes the UNMASKED fused features of its own modalities (audio only
   by default) under ``torch.no_grad``. Its input features come from the student's frontends
   and fusion (data2vec's ``ema_transformer_only``), or from an EMA of the whole backbone.
3. Targets: the mean of the top ``average_top_k_layers`` blocks' FFN outputs, each
   instance-normalised over time (:func:`average_top_k_targets`).
4. Loss positions: masked steps of utterances whose student sees audio; every step of
   video-only utterances (``video_only_loss_all_steps``). The model returns the regression
   head's predictions and the targets there; the ``av_data2vec_regression`` criterion computes
   the loss.

The teacher decay moves linearly from ``ema_decay`` (tau0) to ``ema_end_decay`` (taue) over
``ema_anneal_end_step`` updates, then stays; the teacher takes one EMA step per optimizer
update (``set_num_updates`` with a new update number), so gradient accumulation
(``update_freq``) does not step it several times. Its weights are saved in the checkpoint
under ``_ema.*`` keys, and the update it was last stepped at under ``_ema_updates``, so a
resumed run steps it exactly when an uninterrupted one would (fairseq calls
``set_num_updates`` with the saved update number before it loads the weights).
"""
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model
from fairseq.modules import EMAModule, EMAModuleConfig
from torch import nn

from avplugins.models._variants import register_variant
from avplugins.modules.av_encoder import AVData2VecBackbone, average_top_k_targets
from avplugins.modules.modality import ModalityScheduler
from avplugins.modules.span_mask import compute_span_mask

logger = logging.getLogger(__name__)

FUSION_CHOICES = ChoiceEnum(["add", "concat"])
TEACHER_STATE_PREFIX = "_ema."
TEACHER_UPDATES_KEY = "_ema_updates"


@dataclass
class AVBackboneConfig(FairseqDataclass):
    """The backbone's fields, shared by the pre-training and the seq2seq models (Base sizes)."""

    encoder_embed_dim: int = field(default=768, metadata={"help": "model width D"})
    encoder_layers: int = field(default=12, metadata={"help": "transformer blocks"})
    encoder_attention_heads: int = field(default=12, metadata={"help": "attention heads"})
    encoder_ffn_embed_dim: int = field(default=3072, metadata={"help": "FFN hidden width"})
    audio_feature_dim: int = field(
        default=104, metadata={"help": "audio input width (26 log filterbanks x 4 stacked frames)"}
    )
    resnet_width: int = field(
        default=64, metadata={"help": "channels of the ResNet stem / first stage (64 = ResNet-18)"}
    )
    resnet_stem_pool: bool = field(
        default=True,
        metadata={"help": "max-pool after the ResNet stem (ResNet-18); false keeps lip detail in small crops"},
    )
    fusion: FUSION_CHOICES = field(
        default="add", metadata={"help": "early fusion: element-wise add, or concat + projection"}
    )
    conv_pos: int = field(default=128, metadata={"help": "taps of the convolutional position embedding"})
    conv_pos_groups: int = field(default=16, metadata={"help": "groups of the position convolution"})
    layer_norm_eps: float = field(default=1e-5, metadata={"help": "LayerNorm epsilon"})
    dropout_input: float = field(default=0.1, metadata={"help": "dropout on the fused features"})
    dropout: float = field(default=0.1, metadata={"help": "dropout in the transformer"})
    attention_dropout: float = field(default=0.1, metadata={"help": "dropout on attention weights"})
    activation_dropout: float = field(default=0.0, metadata={"help": "dropout after the FFN activation"})
    encoder_layerdrop: float = field(default=0.05, metadata={"help": "probability of skipping a block"})


# Fields that fix the backbone's parameter shapes or architecture (what a fine-tuned model
# must copy from its pre-trained checkpoint); the others are regularisation, free to change.
BACKBONE_SHAPE_FIELDS = (
    "encoder_embed_dim", "encoder_layers", "encoder_attention_heads", "encoder_ffn_embed_dim",
    "audio_feature_dim", "resnet_width", "resnet_stem_pool", "fusion", "conv_pos", "conv_pos_groups",
    "layer_norm_eps",
)


def build_backbone(cfg: AVBackboneConfig) -> AVData2VecBackbone:
    """An :class:`AVData2VecBackbone` with the sizes and dropouts of ``cfg``."""
    return AVData2VecBackbone(
        dim=cfg.encoder_embed_dim,
        depth=cfg.encoder_layers,
        heads=cfg.encoder_attention_heads,
        ffn_dim=cfg.encoder_ffn_embed_dim,
        audio_feature_dim=cfg.audio_feature_dim,
        trunk_width=cfg.resnet_width,
        stem_pool=cfg.resnet_stem_pool,
        fusion=str(cfg.fusion),
        input_dropout=cfg.dropout_input,
        dropout=cfg.dropout,
        attn_dropout=cfg.attention_dropout,
        activation_dropout=cfg.activation_dropout,
        layerdrop=cfg.encoder_layerdrop,
        conv_pos=cfg.conv_pos,
        conv_pos_groups=cfg.conv_pos_groups,
        norm_eps=cfg.layer_norm_eps,
    )


@dataclass
class AVData2VecConfig(AVBackboneConfig):
    # span masking of the student's fused features
    mask_prob: float = field(default=0.5, metadata={"help": "span-start rate (fairseq convention)"})
    mask_length: int = field(default=10, metadata={"help": "steps per masked span"})
    mask_min_spans: int = field(default=2, metadata={"help": "at least this many spans per utterance"})
    # modality schedulers: P(audio+video), P(audio only | not audio+video), linear start -> end
    student_p_av_start: float = field(default=0.5, metadata={"help": "student P(audio+video) at update 0"})
    student_p_av_end: float = field(default=0.5, metadata={"help": "student P(audio+video) after the ramp"})
    student_p_audio_start: float = field(
        default=0.5, metadata={"help": "student P(audio only | not audio+video) at update 0"}
    )
    student_p_audio_end: float = field(
        default=0.5, metadata={"help": "student P(audio only | not audio+video) after the ramp"}
    )
    student_modality_ramp_updates: int = field(
        default=0, metadata={"help": "updates of the student's linear ramp (0: end values throughout)"}
    )
    teacher_p_av_start: float = field(default=0.0, metadata={"help": "teacher P(audio+video) at update 0"})
    teacher_p_av_end: float = field(default=0.0, metadata={"help": "teacher P(audio+video) after the ramp"})
    teacher_p_audio_start: float = field(
        default=1.0, metadata={"help": "teacher P(audio only | not audio+video) at update 0"}
    )
    teacher_p_audio_end: float = field(
        default=1.0, metadata={"help": "teacher P(audio only | not audio+video) after the ramp"}
    )
    teacher_modality_ramp_updates: int = field(
        default=0, metadata={"help": "updates of the teacher's linear ramp (0: end values throughout)"}
    )
    teacher_masked: bool = field(
        default=False, metadata={"help": "give the teacher the student's masked input (paper: unmasked)"}
    )
    video_only_loss_all_steps: bool = field(
        default=True, metadata={"help": "video-only students are scored on every step, not only masked ones"}
    )
    # targets
    average_top_k_layers: int = field(default=8, metadata={"help": "teacher blocks averaged into targets"})
    # EMA teacher
    ema_decay: float = field(default=0.999, metadata={"help": "teacher decay tau0 at update 0"})
    ema_end_decay: float = field(default=0.9999, metadata={"help": "teacher decay taue after the anneal"})
    ema_anneal_end_step: int = field(
        default=30000, metadata={"help": "updates over which the decay moves linearly tau0 -> taue"}
    )
    ema_transformer_only: bool = field(
        default=True,
        metadata={"help": "EMA of the transformer encoder only (its input from the student's frontends)"},
    )
    ema_layers_only: bool = field(
        default=True, metadata={"help": "copy the position convolution from the student instead of averaging it"}
    )


def annealed_decay(start: float, end: float, update: int, anneal_updates: int) -> float:
    """Teacher decay at ``update``: linear from ``start`` (update 0) to ``end`` (update
    ``anneal_updates`` and later)."""
    if anneal_updates <= 0 or update >= anneal_updates:
        return end
    return start + (end - start) * update / anneal_updates


def draw_streams(
    who: str,
    scheduler: ModalityScheduler,
    batch_size: int,
    update: int,
    has_audio: bool,
    has_video: bool,
    device: torch.device,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(use_audio, use_video), each (B,) bool on ``device``, for the streams the batch has.

    With both streams present the scheduler draws per utterance; with one present every
    utterance gets it, unless the scheduler never uses it (then there is no valid input).
    """
    if has_audio and has_video:
        use_audio, use_video = scheduler.sample(batch_size, update)
        return use_audio.to(device), use_video.to(device)
    p_av, p_audio_only, p_video_only = scheduler.probabilities(update)
    if not has_audio and not has_video:
        raise ValueError("the batch has neither audio nor video")
    if has_audio and p_av + p_audio_only == 0.0:
        raise ValueError(
            f"the batch has audio only but the {who} is configured never to see audio "
            f"(model.{who}_p_*): pre-train with task.modalities=audio,video or change them"
        )
    if has_video and p_av + p_video_only == 0.0:
        raise ValueError(
            f"the batch has video only but the {who} is configured never to see video "
            f"(model.{who}_p_* say audio only): pre-train with task.modalities=audio,video "
            "or change them"
        )
    present = torch.ones(batch_size, dtype=torch.bool, device=device)
    return (present, ~present) if has_audio else (~present, present)


def mean_channel_std(x: torch.Tensor) -> torch.Tensor:
    """data2vec's ``compute_var`` (what it logs as target_var / pred_var): the mean over the
    D channels of each channel's standard deviation across the N rows of ``x`` (N, D).
    NaN when N < 2."""
    x = x.float()
    if x.shape[0] < 2:
        return torch.full((), float("nan"), device=x.device)
    return torch.sqrt(x.var(dim=0) + 1e-6).mean()


def loss_positions(
    mask: torch.Tensor,
    padding_mask: Optional[torch.Tensor],
    use_audio: torch.Tensor,
    video_only_all_steps: bool,
) -> torch.Tensor:
    """(B, T) bool: where the student is scored.

    Masked valid steps of utterances whose student sees audio; every valid step of video-only
    utterances when ``video_only_all_steps`` (predicting audio targets from lips is informative
    even where the input is not masked), else their masked steps too.
    """
    valid = torch.ones_like(mask) if padding_mask is None else ~padding_mask
    positions = mask & valid
    if video_only_all_steps:
        positions = torch.where(use_audio[:, None], positions, valid)
    return positions


@register_model("av_data2vec", dataclass=AVData2VecConfig)
class AVData2VecModel(BaseFairseqModel):
    """Student backbone + regression head, EMA teacher of the encoder (see the module docstring).

    ``forward(audio, video, padding_mask)`` takes the task's ``net_input`` and returns a dict:
    ``predictions`` (N, D) and ``targets`` (N, D, float32) at the N loss positions,
    ``num_positions`` N, ``target_var`` / ``pred_var`` (see :func:`mean_channel_std`),
    ``ema_decay``, ``num_updates``, ``mask`` (B, T) and ``loss_mask`` (B, T) bool,
    ``use_audio`` / ``use_video`` (B,) bool (the student's streams).
    """

    def __init__(self, cfg: AVData2VecConfig):
        super().__init__()
        if not 1 <= cfg.average_top_k_layers <= cfg.encoder_layers:
            raise ValueError(
                f"model.average_top_k_layers={cfg.average_top_k_layers} must be between 1 and "
                f"model.encoder_layers={cfg.encoder_layers}"
            )
        self.cfg = cfg
        self.backbone = build_backbone(cfg)
        self.regression_head = nn.Linear(cfg.encoder_embed_dim, cfg.encoder_embed_dim)
        self.student_modalities = ModalityScheduler(
            cfg.student_p_av_start, cfg.student_p_av_end,
            cfg.student_p_audio_start, cfg.student_p_audio_end,
            cfg.student_modality_ramp_updates,
        )
        self.teacher_modalities = ModalityScheduler(
            cfg.teacher_p_av_start, cfg.teacher_p_av_end,
            cfg.teacher_p_audio_start, cfg.teacher_p_audio_end,
            cfg.teacher_modality_ramp_updates,
        )
        self.ema: Optional[EMAModule] = None  # not a submodule: no gradients, not in the optimizer
        self.num_updates = 0
        self.teacher_updates = 0  # the update number the teacher was created or last stepped at

    @classmethod
    def build_model(cls, cfg: AVData2VecConfig, task=None):
        return cls(cfg)

    # --- teacher -------------------------------------------------------------------------
    def _teacher_source(self) -> nn.Module:
        """The student module the teacher averages."""
        return self.backbone.encoder if self.cfg.ema_transformer_only else self.backbone

    def _teacher_skip_keys(self) -> set:
        """Parameters copied from the student instead of averaged (data2vec's layers-only)."""
        if not self.cfg.ema_layers_only:
            return set()
        prefix = "pos_conv." if self.cfg.ema_transformer_only else "encoder.pos_conv."
        return {f"{prefix}{name}" for name, _ in self.backbone.encoder.pos_conv.named_parameters()}

    def teacher_decay(self, update: int) -> float:
        """The teacher decay at ``update`` (see :func:`annealed_decay`)."""
        return annealed_decay(self.cfg.ema_decay, self.cfg.ema_end_decay, update, self.cfg.ema_anneal_end_step)

    def make_teacher(self, update: Optional[int] = None) -> EMAModule:
        """(Re)create the teacher as a copy of the student (fp32 master weights), with the
        decay of ``update`` (default: the model's update number)."""
        self.teacher_updates = self.num_updates if update is None else update
        self.ema = EMAModule(
            self._teacher_source(),
            EMAModuleConfig(ema_decay=self.cfg.ema_decay, ema_fp32=True),
            skip_keys=self._teacher_skip_keys(),
        )
        self.ema.set_decay(self.teacher_decay(self.teacher_updates))
        return self.ema

    def teacher(self) -> nn.Module:
        """The teacher network, created on first use and moved to the student's device."""
        if self.ema is None:
            self.make_teacher()
        device = self.regression_head.weight.device
        if next(self.ema.model.parameters()).device != device:
            self.ema.model.to(device)
            self.ema.fp32_params = {key: value.to(device) for key, value in self.ema.fp32_params.items()}
        return self.ema.model

    def set_num_updates(self, num_updates: int) -> None:
        """Anneal the teacher decay and take one EMA step per new optimizer update.

        The step is due when ``num_updates`` is past the update the teacher was last stepped
        at (not the model's own counter, which fairseq sets before loading a checkpoint)."""
        super().set_num_updates(num_updates)
        self.num_updates = num_updates
        if self.ema is None:
            self.make_teacher(num_updates)
        elif self.training and num_updates > self.teacher_updates:
            decay = self.teacher_decay(num_updates)
            self.ema.set_decay(decay)
            if decay < 1.0:
                self.teacher()  # on the student's device before averaging
                self.ema.step(self._teacher_source())
            self.teacher_updates = num_updates

    def state_dict(self, destination=None, prefix="", keep_vars=False):
        state = super().state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        if self.ema is not None:
            for key, value in self.ema.fp32_params.items():
                state[prefix + TEACHER_STATE_PREFIX + key] = value
            state[prefix + TEACHER_UPDATES_KEY] = torch.tensor(self.teacher_updates, dtype=torch.long)
        return state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Load the student, then the teacher and its update number. A checkpoint written
        before ``_ema_updates`` existed comes from a trainer that saves after update N, when
        the teacher was last stepped at update N - 1 (fairseq has already set N here)."""
        teacher_prefix = prefix + TEACHER_STATE_PREFIX
        teacher_keys = [key for key in state_dict if key.startswith(teacher_prefix)]
        teacher_state = {key[len(teacher_prefix):]: state_dict.pop(key) for key in teacher_keys}
        saved_updates = state_dict.pop(prefix + TEACHER_UPDATES_KEY, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if teacher_state:
            teacher_updates = max(self.num_updates - 1, 0) if saved_updates is None else int(saved_updates)
            if self.ema is None:
                self.make_teacher(teacher_updates)
            self.ema.restore(teacher_state, build_fp32_params=True)
            self.teacher_updates = teacher_updates
            self.ema.set_decay(self.teacher_decay(teacher_updates))

    # --- forward -------------------------------------------------------------------------
    @torch.no_grad()
    def compute_targets(
        self,
        audio: Optional[torch.Tensor],
        video: Optional[torch.Tensor],
        padding_mask: Optional[torch.Tensor],
        mask: Optional[torch.Tensor],
        use_audio: torch.Tensor,
        use_video: torch.Tensor,
    ) -> torch.Tensor:
        """Teacher targets (B, T, D) float32 for the given teacher streams and optional mask.

        Everything runs under ``torch.no_grad``: the teacher keeps no activations.
        """
        teacher = self.teacher().eval()
        audio = audio if bool(use_audio.any()) else None
        video = video if bool(use_video.any()) else None
        if self.cfg.ema_transformer_only:
            x = self.backbone.embed(audio, video, use_audio, use_video)
            if mask is not None:
                x = self.backbone.mask_embedding(x, mask)
            layer_results = teacher(x, padding_mask, return_layer_ffn_outputs=True)["layer_results"]
        else:
            layer_results = teacher(
                audio, video, padding_mask, mask=mask, return_layer_ffn_outputs=True,
                use_audio=use_audio, use_video=use_video,
            )["layer_results"]
        return average_top_k_targets(layer_results, self.cfg.average_top_k_layers, padding_mask)

    def forward(
        self,
        audio: Optional[torch.Tensor] = None,
        video: Optional[torch.Tensor] = None,
        padding_mask: Optional[torch.Tensor] = None,
        **unused,
    ) -> Dict[str, Any]:
        """
        Args:
            audio: (B, T, 104) stacked filterbanks or None.
            video: (B, 1, T, H, W) normalised mouth crops or None.
            padding_mask: (B, T) bool, True at padding, or None.
        Returns:
            see the class docstring.
        """
        reference = audio if audio is not None else video
        if reference is None:
            raise ValueError("AVData2VecModel needs audio, video or both in net_input")
        batch_size = reference.shape[0]
        num_steps = audio.shape[1] if audio is not None else video.shape[2]
        device = reference.device
        has_audio, has_video = audio is not None, video is not None
        use_audio, use_video = draw_streams(
            "student", self.student_modalities, batch_size, self.num_updates, has_audio, has_video, device
        )
        mask = compute_span_mask(
            batch_size, num_steps, self.cfg.mask_prob, self.cfg.mask_length,
            padding_mask=padding_mask, min_masks=self.cfg.mask_min_spans,
        ).to(device)
        student = self.backbone(
            audio if bool(use_audio.any()) else None,
            video if bool(use_video.any()) else None,
            padding_mask, mask=mask, use_audio=use_audio, use_video=use_video,
        )
        teacher_audio, teacher_video = draw_streams(
            "teacher", self.teacher_modalities, batch_size, self.num_updates, has_audio, has_video, device
        )
        targets = self.compute_targets(
            audio, video, padding_mask, mask if self.cfg.teacher_masked else None,
            teacher_audio, teacher_video,
        )
        loss_mask = loss_positions(mask, padding_mask, use_audio, self.cfg.video_only_loss_all_steps)
        predictions = self.regression_head(student["x"][loss_mask])
        targets = targets[loss_mask]
        with torch.no_grad():
            target_var, pred_var = mean_channel_std(targets), mean_channel_std(predictions)
        return {
            "predictions": predictions,
            "targets": targets,
            "num_positions": int(loss_mask.sum()),
            "target_var": target_var,
            "pred_var": pred_var,
            "ema_decay": self.ema.get_decay(),
            "num_updates": self.num_updates,
            "mask": mask,
            "loss_mask": loss_mask,
            "use_audio": use_audio,
            "use_video": use_video,
        }

    def extract_features(
        self,
        audio: Optional[torch.Tensor] = None,
        video: Optional[torch.Tensor] = None,
        padding_mask: Optional[torch.Tensor] = None,
    ) -> Dict[str, Any]:
        """The student's unmasked representations: dict with ``x`` (B, T, D), ``layer_results``
        (every block's FFN output) and ``padding_mask``."""
        return self.backbone(audio, video, padding_mask, return_layer_ffn_outputs=True)


TINY_BACKBONE = {
    "encoder_embed_dim": 128,
    "encoder_layers": 4,
    "encoder_attention_heads": 4,
    "encoder_ffn_embed_dim": 512,
    "resnet_width": 8,
    "conv_pos": 32,
    "conv_pos_groups": 8,
}
LARGE_BACKBONE = {
    "encoder_embed_dim": 1024,
    "encoder_layers": 24,
    "encoder_attention_heads": 16,
    "encoder_ffn_embed_dim": 4096,
}

register_variant(AVData2VecModel, "av_data2vec", "base", {})
register_variant(AVData2VecModel, "av_data2vec", "large", LARGE_BACKBONE)
register_variant(AVData2VecModel, "av_data2vec", "tiny", {**TINY_BACKBONE, "average_top_k_layers": 3})
