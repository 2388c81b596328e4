"""AV-data2vec fine-tuned for recognition: the pre-trained backbone as encoder + fairseq's
``TransformerDecoder``, trained with ``label_smoothed_cross_entropy`` and decoded with
fairseq's beam search (``fairseq-generate``, task ``av_speech_recognition``).

The encoder reads whatever streams the batch carries (the task's ``modalities``: ASR, VSR or
AVSR), never masks, and stays frozen (no gradients) for the first ``freeze_finetune_updates``
updates. ``model.w2v_path`` names an ``av_data2vec`` pre-training checkpoint: its student
backbone initialises the encoder and its shape fields (width, depth, ...) replace this
config's; the pre-training config is kept in ``model.w2v_args`` so a fine-tuned checkpoint
reloads without the pre-training file. Without ``w2v_path`` the encoder starts from random
weights (the baseline that pre-training must beat).
"""
import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from fairseq import checkpoint_utils
from fairseq.models import FairseqEncoder, FairseqEncoderDecoderModel, register_model
from fairseq.models.transformer import TransformerConfig, TransformerDecoderBase
from fairseq.models.transformer.transformer_base import Embedding
from fairseq.models.transformer.transformer_config import DecoderConfig, EncDecBaseConfig
from omegaconf import OmegaConf, open_dict
from torch import nn

from avplugins.models._variants import register_variant
from avplugins.models.av_data2vec import (
    BACKBONE_SHAPE_FIELDS,
    LARGE_BACKBONE,
    TINY_BACKBONE,
    AVBackboneConfig,
    build_backbone,
    draw_streams,
)
from avplugins.modules.av_encoder import AVData2VecBackbone
from avplugins.modules.modality import ModalityScheduler
from avplugins.modules.span_mask import compute_span_mask

logger = logging.getLogger(__name__)

PRETRAINED_BACKBONE_PREFIX = "backbone."


@dataclass
class AVData2VecSeq2SeqConfig(AVBackboneConfig):
    w2v_path: Optional[str] = field(
        default=None, metadata={"help": "av_data2vec pre-training checkpoint (none: random init)"}
    )
    w2v_args: Any = field(
        default=None, metadata={"help": "the pre-training model config (filled in from w2v_path)"}
    )
    freeze_finetune_updates: int = field(
        default=0, metadata={"help": "the encoder gets no gradients for this many updates"}
    )
    encoder_output_dropout: float = field(default=0.0, metadata={"help": "dropout on the encoder output"})
    # fine-tuning regularisation of the encoder (AV-HuBERT's fine-tuning values)
    dropout_input: float = field(default=0.0, metadata={"help": "dropout on the fused features"})
    dropout: float = field(default=0.0, metadata={"help": "dropout in the encoder transformer"})
    attention_dropout: float = field(default=0.0, metadata={"help": "encoder attention-weight dropout"})
    activation_dropout: float = field(default=0.1, metadata={"help": "encoder FFN activation dropout"})
    encoder_layerdrop: float = field(default=0.1, metadata={"help": "encoder block skip probability"})
    # optional span masking of the encoder input while fine-tuning (training only; wav2vec 2.0's
    # apply_mask, off in AV-HuBERT's recipes)
    apply_mask: bool = field(default=False, metadata={"help": "span-mask the fused features in training"})
    mask_prob: float = field(default=0.5, metadata={"help": "span-start rate when apply_mask"})
    mask_length: int = field(default=10, metadata={"help": "steps per masked span when apply_mask"})
    # optional modality dropout while fine-tuning on audio+video batches (training only)
    finetune_p_av: float = field(
        default=1.0, metadata={"help": "P(audio+video) per utterance in training (1: no modality dropout)"}
    )
    finetune_p_audio: float = field(
        default=0.5, metadata={"help": "P(audio only | not audio+video) in training"}
    )
    # decoder (Base)
    decoder_embed_dim: int = field(default=768, metadata={"help": "decoder width"})
    decoder_ffn_embed_dim: int = field(default=3072, metadata={"help": "decoder FFN hidden width"})
    decoder_layers: int = field(default=6, metadata={"help": "decoder blocks"})
    decoder_attention_heads: int = field(default=4, metadata={"help": "decoder attention heads"})
    decoder_normalize_before: bool = field(default=True, metadata={"help": "pre-LN decoder blocks"})
    decoder_learned_pos: bool = field(default=False, metadata={"help": "learned (not sinusoidal) positions"})
    decoder_dropout: float = field(default=0.1, metadata={"help": "decoder dropout"})
    decoder_attention_dropout: float = field(default=0.0, metadata={"help": "decoder attention dropout"})
    decoder_activation_dropout: float = field(default=0.1, metadata={"help": "decoder FFN activation dropout"})
    decoder_layerdrop: float = field(default=0.0, metadata={"help": "decoder block skip probability"})
    max_target_positions: int = field(default=2048, metadata={"help": "longest token sequence"})
    share_decoder_input_output_embed: bool = field(
        default=True, metadata={"help": "tie the decoder's input embedding and output projection"}
    )
    # hybrid CTC/attention training (ESPnet-style): a linear CTC head on the encoder output,
    # trained by fairseq's label_smoothed_cross_entropy_with_ctc; decoding stays attention-only
    ctc_head: bool = field(
        default=False,
        metadata={"help": "add a CTC projection on the encoder output (criterion "
                  "label_smoothed_cross_entropy_with_ctc); its blank is the dictionary's <s>"},
    )


def load_pretrained_backbone(path: str) -> Tuple[Any, Dict[str, torch.Tensor]]:
    """Read an ``av_data2vec`` pre-training checkpoint.

    Returns:
        (the pre-training model config, the student backbone's state dict without prefix).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"model.w2v_path={path!r} does not exist; point it at a checkpoint of an "
            "av_data2vec pre-training run (e.g. checkpoints/checkpoint_last.pt)"
        )
    state = checkpoint_utils.load_checkpoint_to_cpu(path)
    model_cfg = (state.get("cfg") or {}).get("model")
    name = model_cfg.get("_name") if model_cfg is not None else None
    if name is None or not name.startswith("av_data2vec") or name.startswith("av_data2vec_seq2seq"):
        raise ValueError(
            f"model.w2v_path={path!r} holds a {name!r} model; it must be an av_data2vec "
            "pre-training checkpoint (model._name av_data2vec or av_data2vec_base/large/tiny)"
        )
    backbone_state = {
        key[len(PRETRAINED_BACKBONE_PREFIX):]: value
        for key, value in state["model"].items()
        if key.startswith(PRETRAINED_BACKBONE_PREFIX)
    }
    if not backbone_state:
        raise ValueError(f"model.w2v_path={path!r} has no '{PRETRAINED_BACKBONE_PREFIX}*' weights")
    return model_cfg, backbone_state


def pretrained_shapes(cfg: AVData2VecSeq2SeqConfig, pretrained_cfg: Any) -> Dict[str, Any]:
    """The shape fields of the pre-training config (which ``cfg`` must adopt), logging every
    value that differs from ``cfg``'s. A field the checkpoint predates gets its default."""
    defaults = AVBackboneConfig()
    shapes = {name: pretrained_cfg.get(name, getattr(defaults, name)) for name in BACKBONE_SHAPE_FIELDS}
    for name, value in shapes.items():
        if getattr(cfg, name) != value:
            logger.info("model.%s = %s from the pre-trained checkpoint (config said %s)", name, value, getattr(cfg, name))
    return shapes


def load_backbone_weights(backbone: AVData2VecBackbone, state: Dict[str, torch.Tensor], path: str) -> None:
    """Load ``state`` into ``backbone``, with an error naming every mismatch."""
    own = backbone.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(
        f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(own[key].shape)}"
        for key in set(own) & set(state)
        if state[key].shape != own[key].shape
    )
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"the backbone weights in {path} do not fit the encoder: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}, wrong shape {wrong_shape[:8]} (first 8 of each); "
            "was it written by a different version of avplugins?"
        )
    backbone.load_state_dict(state)


def build_decoder_config(cfg: AVData2VecSeq2SeqConfig) -> TransformerConfig:
    """fairseq's ``TransformerConfig`` for the decoder, from this model's flat fields."""
    return TransformerConfig(
        dropout=cfg.decoder_dropout,
        attention_dropout=cfg.decoder_attention_dropout,
        activation_dropout=cfg.decoder_activation_dropout,
        encoder=EncDecBaseConfig(embed_dim=cfg.encoder_embed_dim),
        decoder=DecoderConfig(
            embed_dim=cfg.decoder_embed_dim,
            ffn_embed_dim=cfg.decoder_ffn_embed_dim,
            layers=cfg.decoder_layers,
            attention_heads=cfg.decoder_attention_heads,
            normalize_before=cfg.decoder_normalize_before,
            learned_pos=cfg.decoder_learned_pos,
            layerdrop=cfg.decoder_layerdrop,
        ),
        max_target_positions=cfg.max_target_positions,
        share_decoder_input_output_embed=cfg.share_decoder_input_output_embed,
    )


class AVData2VecEncoder(FairseqEncoder):
    """The backbone as a fairseq encoder (no masking).

    ``forward(audio, video, padding_mask)`` returns fairseq's encoder-output dict:
    ``encoder_out`` [(T, B, D)] and ``encoder_padding_mask`` [(B, T)] (empty lists when absent).

    Args:
        backbone: the (pre-trained) backbone.
        freeze_finetune_updates: no gradients into the backbone before this update.
        output_dropout: dropout on the encoder output.
        modality_scheduler: optional per-utterance modality dropout, in training only and
            only for batches that carry both streams.
        mask_prob, mask_length: span masking of the fused features in training (0: none).
    """

    def __init__(
        self,
        backbone: AVData2VecBackbone,
        freeze_finetune_updates: int = 0,
        output_dropout: float = 0.0,
        modality_scheduler: Optional[ModalityScheduler] = None,
        mask_prob: float = 0.0,
        mask_length: int = 10,
    ):
        super().__init__(dictionary=None)
        self.backbone = backbone
        self.mask_prob = mask_prob
        self.mask_length = mask_length
        self.freeze_finetune_updates = freeze_finetune_updates
        self.output_dropout = nn.Dropout(output_dropout)
        self.modality_scheduler = modality_scheduler
        self.num_updates = 0

    def set_num_updates(self, num_updates: int) -> None:
        super().set_num_updates(num_updates)
        self.num_updates = num_updates

    @property
    def frozen(self) -> bool:
        return self.num_updates < self.freeze_finetune_updates

    def forward(
        self,
        audio: Optional[torch.Tensor] = None,
        video: Optional[torch.Tensor] = None,
        padding_mask: Optional[torch.Tensor] = None,
        **unused,
    ) -> Dict[str, List[torch.Tensor]]:
        """audio (B, T, 104) | None, video (B, 1, T, H, W) | None, padding_mask (B, T) bool."""
        use_audio = use_video = None
        if self.training and self.modality_scheduler is not None and audio is not None and video is not None:
            use_audio, use_video = draw_streams(
                "finetune", self.modality_scheduler, audio.shape[0], self.num_updates, True, True, audio.device
            )
        mask = None
        if self.training and self.mask_prob > 0:
            batch, steps = (audio.shape[0], audio.shape[1]) if audio is not None else (video.shape[0], video.shape[2])
            device = (audio if audio is not None else video).device
            mask = compute_span_mask(batch, steps, self.mask_prob, self.mask_length, padding_mask).to(device)
        with torch.no_grad() if self.frozen else torch.enable_grad():
            x = self.backbone(audio, video, padding_mask, mask=mask, use_audio=use_audio, use_video=use_video)["x"]
        x = self.output_dropout(x).transpose(0, 1)
        return {
            "encoder_out": [x],
            "encoder_padding_mask": [padding_mask] if padding_mask is not None else [],
            "encoder_embedding": [],
            "encoder_states": [],
            "src_tokens": [],
            "src_lengths": [],
        }

    def reorder_encoder_out(self, encoder_out: Dict[str, List[torch.Tensor]], new_order: torch.Tensor):
        """Select / repeat batch rows (beam search): (T, B, D) along B, (B, T) along B."""
        return {
            **encoder_out,
            "encoder_out": [x.index_select(1, new_order) for x in encoder_out["encoder_out"]],
            "encoder_padding_mask": [m.index_select(0, new_order) for m in encoder_out["encoder_padding_mask"]],
        }

    def max_positions(self):
        return None


CTC_BLANK_INDEX = 0  # F.ctc_loss's default blank; fairseq dictionaries put <s> (never a target) there


@register_model("av_data2vec_seq2seq", dataclass=AVData2VecSeq2SeqConfig)
class AVData2VecSeq2SeqModel(FairseqEncoderDecoderModel):
    """Encoder + ``TransformerDecoder``; with ``ctc_projection`` (``model.ctc_head``) also the
    CTC output that ``label_smoothed_cross_entropy_with_ctc`` trains."""

    def __init__(self, encoder, decoder, ctc_projection: Optional[nn.Linear] = None):
        super().__init__(encoder, decoder)
        self.ctc_projection = ctc_projection

    @classmethod
    def build_model(cls, cfg: AVData2VecSeq2SeqConfig, task):
        backbone_state, config_updates = None, {}
        if cfg.w2v_path and cfg.w2v_args is None:
            pretrained_cfg, backbone_state = load_pretrained_backbone(cfg.w2v_path)
            config_updates = {"w2v_args": pretrained_cfg, **pretrained_shapes(cfg, pretrained_cfg)}
            with open_dict(cfg) if OmegaConf.is_config(cfg) else contextlib.nullcontext():
                for name, value in config_updates.items():
                    setattr(cfg, name, value)
        backbone = build_backbone(cfg)
        if backbone_state is not None:
            load_backbone_weights(backbone, backbone_state, cfg.w2v_path)
            logger.info("encoder initialised from %s", cfg.w2v_path)
        scheduler = None
        if cfg.finetune_p_av < 1.0:
            scheduler = ModalityScheduler(cfg.finetune_p_av, cfg.finetune_p_av, cfg.finetune_p_audio, cfg.finetune_p_audio, 0)
        encoder = AVData2VecEncoder(
            backbone, cfg.freeze_finetune_updates, cfg.encoder_output_dropout, scheduler,
            mask_prob=cfg.mask_prob if cfg.apply_mask else 0.0, mask_length=cfg.mask_length,
        )
        dictionary = task.target_dictionary
        if dictionary is None:
            raise ValueError("av_data2vec_seq2seq needs a task with a target dictionary (av_speech_recognition)")
        embed_tokens = Embedding(len(dictionary), cfg.decoder_embed_dim, dictionary.pad())
        decoder = TransformerDecoderBase(build_decoder_config(cfg), dictionary, embed_tokens)
        ctc_projection = None
        if cfg.ctc_head:
            if dictionary.bos() != CTC_BLANK_INDEX:
                raise ValueError(
                    f"model.ctc_head=true uses index {CTC_BLANK_INDEX} as the CTC blank, but this "
                    f"dictionary has <s> at {dictionary.bos()}; build the dictionary with fairseq's "
                    "Dictionary (the task does) or set model.ctc_head=false"
                )
            ctc_projection = nn.Linear(cfg.encoder_embed_dim, len(dictionary))
        model = cls(encoder, decoder, ctc_projection)
        # what the task writes back into the saved config (see AVSpeechRecognitionTask.build_model)
        model.config_updates = config_updates
        return model

    def forward(
        self,
        prev_output_tokens: torch.Tensor,
        audio: Optional[torch.Tensor] = None,
        video: Optional[torch.Tensor] = None,
        padding_mask: Optional[torch.Tensor] = None,
        **unused,
    ):
        """Teacher-forced decoder output (logits (B, L, V), extra) for the task's net_input;
        ``extra["encoder_out"]`` keeps the encoder output and, with a CTC head,
        ``extra["ctc_logits"]`` (T, B, V) its projection. The projection runs here, not in
        ``get_ctc_output``: DDP only accounts for parameters used inside ``forward``."""
        encoder_out = self.encoder(audio=audio, video=video, padding_mask=padding_mask)
        logits, extra = self.decoder(prev_output_tokens, encoder_out=encoder_out)
        extra["encoder_out"] = encoder_out
        if self.ctc_projection is not None:
            extra["ctc_logits"] = self.ctc_projection(encoder_out["encoder_out"][0])
        return logits, extra

    def get_ctc_output(self, net_output, sample=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """CTC log-probabilities (T, B, V) in float32 and the unpadded lengths (B,) in encoder
        steps (25 Hz), from the encoder output that ``forward`` kept."""
        if self.ctc_projection is None:
            raise ValueError(
                "this model has no CTC head: train with model.ctc_head=true to use the "
                "label_smoothed_cross_entropy_with_ctc criterion"
            )
        encoder_out = net_output[1]["encoder_out"]
        ctc_logits = net_output[1]["ctc_logits"]  # (T, B, V)
        log_probs = torch.log_softmax(ctc_logits.float(), dim=-1)
        steps, batch = ctc_logits.shape[:2]
        if encoder_out["encoder_padding_mask"]:
            lengths = (~encoder_out["encoder_padding_mask"][0]).long().sum(dim=1)
        else:
            lengths = torch.full((batch,), steps, dtype=torch.long, device=ctc_logits.device)
        return log_probs, lengths

    @staticmethod
    def get_ctc_target(sample) -> Tuple[torch.Tensor, torch.Tensor]:
        """The CTC targets: (B, L) padded tokens without the final eos, and their lengths (B,)."""
        lengths = sample["target_lengths"] - 1
        return sample["target"][:, : int(lengths.max())], lengths

    def max_positions(self):
        """No length limit: long clips are never dropped (the decoder's sinusoidal positions
        extend as needed)."""
        return None


TINY_DECODER = {
    "decoder_embed_dim": 128,
    "decoder_ffn_embed_dim": 512,
    "decoder_layers": 2,
    "decoder_attention_heads": 4,
}
LARGE_DECODER = {
    "decoder_embed_dim": 1024,
    "decoder_ffn_embed_dim": 4096,
    "decoder_layers": 9,
    "decoder_attention_heads": 8,
}

register_variant(AVData2VecSeq2SeqModel, "av_data2vec_seq2seq", "base", {})
register_variant(AVData2VecSeq2SeqModel, "av_data2vec_seq2seq", "large", {**LARGE_BACKBONE, **LARGE_DECODER})
register_variant(AVData2VecSeq2SeqModel, "av_data2vec_seq2seq", "tiny", {**TINY_BACKBONE, **TINY_DECODER})
