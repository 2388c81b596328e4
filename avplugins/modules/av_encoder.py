"""AV-data2vec backbone: frontends, early fusion, span-mask embedding and the shared encoder.

Time runs at the video frame rate (25 Hz) everywhere: audio arrives as 104-dim stacked log
filterbanks (4 x 26 at 100 Hz -> 25 Hz), video as 88 x 88 grayscale mouth crops, one per step.

The encoder follows wav2vec2's ``TransformerEncoder`` with ``layer_norm_first=True`` (the
AV-HuBERT / data2vec setting): padding steps are zeroed, a convolutional position embedding
is added, NO LayerNorm before the blocks, dropout, pre-LN blocks, final LayerNorm. Its blocks
are the project's shared :class:`~avplugins.modules.attention.TransformerBlock` (one
attention implementation). The data2vec targets (top-K block FFN outputs, instance-normed
over time, averaged) are computed by :func:`average_top_k_targets`.
"""
import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from avplugins.modules.attention import TransformerBlock
from avplugins.modules.resnet_frontend import ResNetVideoFrontend
from avplugins.modules.span_mask import MaskEmbedding, check_padding_mask

AUDIO_FEATURE_DIM = 104  # 26 log filterbanks x 4 stacked 10 ms frames
FUSION_MODES = ("add", "concat")


class AudioFrontend(nn.Module):
    """Linear(feature_dim, out_dim): (B, T, 104) stacked filterbanks -> (B, T, out_dim)."""

    def __init__(self, out_dim: int, feature_dim: int = AUDIO_FEATURE_DIM):
        super().__init__()
        self.proj = nn.Linear(feature_dim, out_dim)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        if audio.ndim != 3 or audio.shape[-1] != self.proj.in_features:
            raise ValueError(
                f"audio must be (B, T, {self.proj.in_features}) stacked filterbank features, "
                f"got shape {tuple(audio.shape)}"
            )
        return self.proj(audio)


class EarlyFusion(nn.Module):
    """Fuses per-step audio and video features into one (B, T, D) sequence.

    ``add``: ``LayerNorm(audio + video)``. ``concat``: ``Linear(LayerNorm([audio, video]))``
    from 2D to D (AV-HuBERT's order: its ``layer_norm`` acts on the concatenation, its
    ``post_extract_proj`` follows). A missing stream (``None``) counts as zeros of the other
    stream's shape, as AV-HuBERT's modality dropout does.

    Args:
        dim: feature width D of each stream and of the output.
        mode: ``add`` or ``concat``.
        norm_eps: LayerNorm epsilon.
    """

    def __init__(self, dim: int, mode: str = "add", norm_eps: float = 1e-5):
        super().__init__()
        if mode not in FUSION_MODES:
            raise ValueError(f"fusion mode must be one of {FUSION_MODES}, got {mode!r}")
        self.mode = mode
        fused_dim = dim if mode == "add" else 2 * dim
        self.norm = nn.LayerNorm(fused_dim, eps=norm_eps)
        self.proj = nn.Linear(fused_dim, dim) if mode == "concat" else nn.Identity()

    def forward(self, audio: Optional[torch.Tensor], video: Optional[torch.Tensor]) -> torch.Tensor:
        """audio, video: (B, T, D) or None (not both) -> (B, T, D)."""
        if audio is None and video is None:
            raise ValueError("EarlyFusion needs at least one of audio and video features")
        audio = torch.zeros_like(video) if audio is None else audio
        video = torch.zeros_like(audio) if video is None else video
        if audio.shape != video.shape:
            raise ValueError(
                f"audio features {tuple(audio.shape)} and video features {tuple(video.shape)} "
                "must have the same (B, T, D) shape"
            )
        fused = audio + video if self.mode == "add" else torch.cat([audio, video], dim=-1)
        return self.proj(self.norm(fused))


class ConvPositionalEmbedding(nn.Module):
    """wav2vec2's convolutional relative position embedding: weight-normed grouped Conv1d
    over time with "same" length, then GELU. Returns the embedding; the encoder adds it.

    Weight norm is over ``dim=2`` (one gain per kernel tap, as fairseq). Checkpoint names map
    as fairseq ``pos_conv.0.weight_g`` -> ``conv.parametrizations.weight.original0``,
    ``pos_conv.0.weight_v`` -> ``conv.parametrizations.weight.original1``,
    ``pos_conv.0.bias`` -> ``conv.bias``.

    Args:
        dim: width D.
        kernel_size: taps over time (128 = 5.12 s at 25 Hz).
        groups: convolution groups (D must be divisible by it).
    """

    def __init__(self, dim: int, kernel_size: int = 128, groups: int = 16):
        super().__init__()
        if dim % groups != 0:
            raise ValueError(f"conv_pos_groups={groups} must divide the width {dim}")
        conv = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=groups)
        # fairseq's init, set before weight norm so the gains start at the kernels' norms.
        nn.init.normal_(conv.weight, mean=0.0, std=math.sqrt(4.0 / (kernel_size * dim)))
        nn.init.zeros_(conv.bias)
        self.conv = weight_norm(conv, name="weight", dim=2)
        # padding k // 2 on both sides yields T + 1 steps for even k: drop the last.
        self.trim_last = kernel_size % 2 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D)."""
        y = self.conv(x.transpose(1, 2))
        if self.trim_last:
            y = y[:, :, :-1]
        return F.gelu(y).transpose(1, 2)


class AVTransformerEncoder(nn.Module):
    """The shared pre-LN transformer encoder (wav2vec2 ``layer_norm_first=True`` order).

    Args:
        dim, depth, heads, ffn_dim: width D, blocks, attention heads, FFN hidden width
            (Base 768 / 12 / 12 / 3072; Large 1024 / 24 / 16 / 4096).
        dropout: after the position embedding, the attention projection and the FFN.
        attn_dropout: on the attention weights.
        activation_dropout: after the FFN activation.
        layerdrop: probability of skipping a whole block, in training only and never when
            block outputs are requested (targets need every block).
        conv_pos, conv_pos_groups: kernel size and groups of the position convolution.
        norm_eps: LayerNorm epsilon (fairseq's 1e-5).
    """

    def __init__(
        self,
        dim: int = 768,
        depth: int = 12,
        heads: int = 12,
        ffn_dim: int = 3072,
        dropout: float = 0.1,
        attn_dropout: float = 0.1,
        activation_dropout: float = 0.0,
        layerdrop: float = 0.05,
        conv_pos: int = 128,
        conv_pos_groups: int = 16,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.pos_conv = ConvPositionalEmbedding(dim, conv_pos, conv_pos_groups)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                dim,
                heads,
                mlp_ratio=ffn_dim / dim,
                dropout=dropout,
                attn_dropout=attn_dropout,
                norm_eps=norm_eps,
                activation="gelu",
                activation_dropout=activation_dropout,
            )
            for _ in range(depth)
        )
        if self.blocks and self.blocks[0].mlp.fc1.out_features != ffn_dim:
            raise ValueError(f"ffn_dim={ffn_dim} is not representable as a multiple of dim={dim}")
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.layerdrop = layerdrop
        self.reset_block_parameters()

    def reset_block_parameters(self) -> None:
        """BERT init of the blocks' linear layers (N(0, 0.02), zero bias), as fairseq's
        ``init_bert_params`` does for wav2vec2 / data2vec / AV-HuBERT encoders."""
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                nn.init.zeros_(module.bias)

    def _skip_block(self, return_layer_ffn_outputs: bool) -> bool:
        if not self.training or return_layer_ffn_outputs or self.layerdrop == 0:
            return False
        return bool(torch.rand(()) < self.layerdrop)

    def forward(
        self,
        x: torch.Tensor,
        padding_mask: Optional[torch.Tensor] = None,
        return_layer_ffn_outputs: bool = False,
    ) -> Dict[str, object]:
        """
        Args:
            x: (B, T, D) input features.
            padding_mask: optional (B, T) bool, True at padding (zeroed on input, never
                attended to).
            return_layer_ffn_outputs: collect every block's FFN output (before its residual
                add, after its dropout) for data2vec targets.
        Returns:
            dict with ``x`` (B, T, D) after the final LayerNorm and ``layer_results``: a list
            of (B, T, D), one per block, empty unless requested.
        """
        check_padding_mask(padding_mask, x.shape[0], x.shape[1])
        if padding_mask is not None:
            x = x.masked_fill(padding_mask[..., None], 0.0)
        x = self.dropout(x + self.pos_conv(x))
        layer_results: List[torch.Tensor] = []
        for block in self.blocks:
            if self._skip_block(return_layer_ffn_outputs):
                continue
            if return_layer_ffn_outputs:
                x, ffn_output = block(x, key_padding_mask=padding_mask, return_ffn_output=True)
                layer_results.append(ffn_output)
            else:
                x = block(x, key_padding_mask=padding_mask)
        return {"x": self.norm(x), "layer_results": layer_results}


class AVData2VecBackbone(nn.Module):
    """Frontends + early fusion + optional span-mask embedding + shared encoder.

    The student/teacher logic and the losses live in the fairseq model; the seq2seq
    recogniser reuses this module as its encoder.

    Args:
        dim, depth, heads, ffn_dim: encoder size (defaults: Base).
        audio_feature_dim: input width of the audio frontend (104).
        trunk_width: ResNet width of the first stage (64 = ResNet-18).
        stem_pool: the ResNet stem's max-pool (see :class:`ResNetVideoFrontend`).
        fusion: ``add`` or ``concat`` (see :class:`EarlyFusion`).
        input_dropout: dropout on the fused features before masking (AV-HuBERT's
            ``dropout_input``).
        dropout, attn_dropout, activation_dropout, layerdrop, conv_pos, conv_pos_groups,
        norm_eps: see :class:`AVTransformerEncoder` (norm_eps also for the fusion norm).
    """

    def __init__(
        self,
        dim: int = 768,
        depth: int = 12,
        heads: int = 12,
        ffn_dim: int = 3072,
        audio_feature_dim: int = AUDIO_FEATURE_DIM,
        trunk_width: int = 64,
        stem_pool: bool = True,
        fusion: str = "add",
        input_dropout: float = 0.1,
        dropout: float = 0.1,
        attn_dropout: float = 0.1,
        activation_dropout: float = 0.0,
        layerdrop: float = 0.05,
        conv_pos: int = 128,
        conv_pos_groups: int = 16,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.audio_frontend = AudioFrontend(dim, audio_feature_dim)
        self.video_frontend = ResNetVideoFrontend(dim, trunk_width, stem_pool=stem_pool)
        self.fusion = EarlyFusion(dim, fusion, norm_eps)
        self.input_dropout = nn.Dropout(input_dropout)
        self.mask_embedding = MaskEmbedding(dim)
        self.encoder = AVTransformerEncoder(
            dim, depth, heads, ffn_dim, dropout, attn_dropout, activation_dropout, layerdrop,
            conv_pos, conv_pos_groups, norm_eps,
        )

    def embed(
        self,
        audio: Optional[torch.Tensor],
        video: Optional[torch.Tensor],
        use_audio: Optional[torch.Tensor] = None,
        use_video: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Fused features before dropout and masking.

        Args:
            audio: (B, T, 104) features or None (no audio for any sample).
            video: (B, 1, T, H, W) frames or None (no video for any sample).
            use_audio, use_video: optional (B,) bool from the modality scheduler; a stream
                is zeroed (after its frontend) for the samples where it is False.
        Returns:
            (B, T, D)
        """
        audio_features = video_features = None
        if audio is not None:
            audio_features = _keep_samples(self.audio_frontend(audio), use_audio)
        if video is not None:
            video_features = _keep_samples(self.video_frontend(video), use_video)
        if audio_features is not None and video_features is not None:
            if audio_features.shape[:2] != video_features.shape[:2]:
                raise ValueError(
                    f"audio has (B, T) = {tuple(audio_features.shape[:2])} but video has "
                    f"{tuple(video_features.shape[:2])}: trim or pad audio to the video length"
                )
        _check_every_sample_has_input(audio_features, video_features, use_audio, use_video)
        return self.fusion(audio_features, video_features)

    def forward(
        self,
        audio: Optional[torch.Tensor] = None,
        video: Optional[torch.Tensor] = None,
        padding_mask: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        return_layer_ffn_outputs: bool = False,
        use_audio: Optional[torch.Tensor] = None,
        use_video: Optional[torch.Tensor] = None,
    ) -> Dict[str, object]:
        """
        Args:
            audio, video, use_audio, use_video: see :meth:`embed`.
            padding_mask: optional (B, T) bool, True at padding. Padding video frames must be
                zeros (the stem's 5-frame temporal kernel sees them before any mask applies);
                padding audio may hold anything.
            mask: optional (B, T) bool, True where the fused features are replaced by the
                learned mask embedding (the same steps for both streams).
            return_layer_ffn_outputs: also return every block's FFN output.
        Returns:
            dict with ``x`` (B, T, D), ``layer_results`` (list of (B, T, D)),
            ``padding_mask`` (as given) and ``features`` (B, T, D): the fused features
            before dropout and masking (what an EMA teacher of the encoder consumes).
        """
        features = self.embed(audio, video, use_audio, use_video)
        x = self.input_dropout(features)
        if mask is not None:
            if mask.dtype != torch.bool or mask.shape != x.shape[:2]:
                raise ValueError(
                    f"mask must be a {tuple(x.shape[:2])} bool tensor, "
                    f"got {mask.dtype} {tuple(mask.shape)}"
                )
            x = self.mask_embedding(x, mask)
        out = self.encoder(x, padding_mask, return_layer_ffn_outputs)
        return {**out, "padding_mask": padding_mask, "features": features}


def _keep_samples(features: torch.Tensor, use: Optional[torch.Tensor]) -> torch.Tensor:
    """Zero the (B, T, D) features of the samples where ``use`` (B,) is False."""
    if use is None:
        return features
    if use.shape != features.shape[:1] or use.dtype != torch.bool:
        raise ValueError(
            f"use_audio / use_video must be ({features.shape[0]},) bool, "
            f"got {use.dtype} {tuple(use.shape)}"
        )
    return torch.where(use[:, None, None], features, torch.zeros_like(features))


def _stream_presence(
    features: Optional[torch.Tensor], use: Optional[torch.Tensor], batch: int
) -> torch.Tensor:
    """(B,) bool: which samples get this stream."""
    if features is None:
        return torch.zeros(batch, dtype=torch.bool)
    if use is None:
        return torch.ones(batch, dtype=torch.bool)
    return use.cpu()


def _check_every_sample_has_input(
    audio_features: Optional[torch.Tensor],
    video_features: Optional[torch.Tensor],
    use_audio: Optional[torch.Tensor],
    use_video: Optional[torch.Tensor],
) -> None:
    """Raise if some sample would get neither stream."""
    if audio_features is None and video_features is None:
        raise ValueError("AVData2VecBackbone needs audio, video or both")
    batch = (audio_features if audio_features is not None else video_features).shape[0]
    has_input = _stream_presence(audio_features, use_audio, batch) | _stream_presence(
        video_features, use_video, batch
    )
    if not bool(has_input.all()):
        raise ValueError(
            "every sample needs audio or video: use_audio | use_video is False for some"
        )


def instance_norm_over_time(
    x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None, eps: float = 1e-5
) -> torch.Tensor:
    """Normalise every channel of every sample to mean 0 / variance 1 over its valid steps.

    The same as data2vec's ``F.instance_norm`` on (B, C, T) (biased variance, ``eps`` 1e-5,
    no affine), except that padding steps are left out of the statistics and set to 0.
    Computed in at least float32 (targets of fp16 models).

    Args:
        x: (B, T, D).
        padding_mask: optional (B, T) bool, True at padding.
    Returns:
        (B, T, D) in float32 (or float64 for float64 input).
    """
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    check_padding_mask(padding_mask, x.shape[0], x.shape[1])
    if padding_mask is None:
        valid = torch.ones_like(x[..., :1])
    else:
        valid = (~padding_mask)[..., None].to(x.dtype)  # (B, T, 1)
    count = valid.sum(dim=1, keepdim=True).clamp(min=1.0)
    mean = (x * valid).sum(dim=1, keepdim=True) / count
    centred = (x - mean) * valid
    var = centred.square().sum(dim=1, keepdim=True) / count
    return centred * torch.rsqrt(var + eps)


def average_top_k_targets(
    layer_results: Sequence[torch.Tensor],
    k: int,
    padding_mask: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """data2vec's contextualised target: the mean of the last ``k`` blocks' FFN outputs, each
    instance-normalised over time (see :func:`instance_norm_over_time`).

    Args:
        layer_results: per-block (B, T, D) outputs, first block first.
        k: how many of the top blocks to average (1 <= k <= len(layer_results)).
        padding_mask: optional (B, T) bool, True at padding (0 in the result).
    Returns:
        (B, T, D) float32 (float64 for float64 input).
    """
    if not 1 <= k <= len(layer_results):
        raise ValueError(
            f"average_top_k_layers={k} must be between 1 and the {len(layer_results)} blocks"
        )
    normed = [instance_norm_over_time(layer, padding_mask, eps) for layer in layer_results[-k:]]
    return torch.stack(normed).mean(dim=0)
