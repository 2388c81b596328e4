"""Synchformer's synchronisation module: a small pre-LN transformer over the projected visual
and audio segment features of a whole clip, read out at a learned OFF token.

Token layout: ``[OFF, visual (S * tv), MOD, audio (S * ta)]`` (1 + 112 + 1 + 84 = 198 for
14 segments), each stream layer-normed on its own, plus one learned position embedding per
token. Heads read token 0 (OFF): ``offset_head`` (21 offset classes) and, in the
synchronizability variant, ``sync_head`` (2 classes).

Two initialisations: the official one (:meth:`SyncTransformer.reset_parameters`) and an
*aligned* one (:meth:`SyncTransformer.init_aligned`) that starts the module as a working
offset detector instead of on the long plateau at loss ln(21) (see its docstring).
"""
from collections import Counter
from typing import Dict, Sequence

import torch
from torch import nn

from avplugins.modules.attention import TransformerBlock, init_transformer_weights


@torch.no_grad()
def zero_head_biases(attention: nn.Module, head: int) -> None:
    """Zero the query, key and value biases of one head of a fused-qkv attention (in place)."""
    if attention.qkv.bias is None:
        return
    head_dim = attention.head_dim
    for bias in attention.qkv.bias.split(attention.num_heads * head_dim):
        bias[head * head_dim:(head + 1) * head_dim].zero_()


class SyncTransformer(nn.Module):
    """
    Args:
        num_visual_tokens: visual tokens per clip (segments x tokens per segment).
        num_audio_tokens: audio tokens per clip.
        dim, depth, num_heads, mlp_ratio: transformer size.
        num_offset_classes: size of ``offset_head``; 0 for none (the official
            synchronizability model has only ``sync_head``).
        sync_head: add the binary synchronizability head.
        dropout: after the position embedding, after the attention projection and after the
            MLP (none after the MLP activation, as the official module).
        attn_dropout: dropout on attention weights.
        norm_eps: LayerNorm epsilon (PyTorch default 1e-5, as the official module).
    """

    def __init__(
        self,
        num_visual_tokens: int = 112,
        num_audio_tokens: int = 84,
        dim: int = 768,
        depth: int = 3,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        num_offset_classes: int = 21,
        sync_head: bool = False,
        dropout: float = 0.1,
        attn_dropout: float = 0.1,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        if num_offset_classes <= 0 and not sync_head:
            raise ValueError("SyncTransformer needs an offset head, a sync head or both")
        self.num_visual_tokens = num_visual_tokens
        self.num_audio_tokens = num_audio_tokens
        self.dim = dim
        self.off_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mod_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.visual_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.audio_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.pos_embed = nn.Parameter(torch.zeros(1, 2 + num_visual_tokens + num_audio_tokens, dim))
        self.embed_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                dim, num_heads, mlp_ratio, qkv_bias=True, dropout=dropout,
                attn_dropout=attn_dropout, norm_eps=norm_eps, activation_dropout=0.0,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.offset_head = nn.Linear(dim, num_offset_classes) if num_offset_classes > 0 else None
        self.sync_head = nn.Linear(dim, 2) if sync_head else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_transformer_weights(self)
        # the official module draws its OFF / MOD tokens and position embedding from N(0, 1)
        for token in (self.off_token, self.mod_token, self.pos_embed):
            nn.init.normal_(token)

    def aligned_channels(self, content_dim: int, num_segments: int) -> Dict[str, object]:
        """The residual channels :meth:`init_aligned` uses, after the ``content_dim`` content
        channels ``0 .. content_dim-1``: ``modality`` (+ visual, - audio), ``off_flag`` (marks
        the OFF token), ``segment`` (one-hot segment index of a token, ``num_segments`` wide) and
        ``scores`` (first the matched visual segment of an audio token, then its per-class
        match scores: ``max(num_segments, classes)`` wide).

        Raises:
            ValueError: the width leaves no room for them, or head 0 cannot hold them.
        """
        num_classes = self.offset_head.out_features if self.offset_head is not None else 0
        num_scores = max(num_segments, num_classes)
        needed = content_dim + 2 + num_segments + num_scores
        head_dim = self.dim // self.blocks[0].attn.num_heads
        if self.dim < needed or head_dim < max(2, num_scores) or num_classes == 0 or len(self.blocks) < 2:
            raise ValueError(
                f"the aligned sync init needs an offset head, 2 blocks, sync_dim >= feature dim + 2 + "
                f"segments + max(segments, classes) ({needed}) and a head width >= {max(2, num_scores)}, got "
                f"sync_dim {self.dim} with {self.blocks[0].attn.num_heads} heads and {len(self.blocks)} blocks: "
                "raise model.sync_dim or use model.sync_init=official"
            )
        segment = content_dim + 2
        scores = segment + num_segments
        return dict(modality=content_dim, off_flag=content_dim + 1,
                    segment=slice(segment, scores), scores=slice(scores, scores + num_scores))

    @torch.no_grad()
    def init_aligned(
        self,
        content_dim: int,
        class_shifts: Sequence[int],
        visual_tokens_per_segment: int = 1,
        audio_tokens_per_segment: int = 1,
        match_sharpness: float = 3.0,
        vote_gain: float = 4.0,
        gate_margin: float = 8.0,
        head_gain: float = 4.0,
        modality_code: float = 3.0,
        modality_gain: float = 12.0,
        readout_gain: float = 2.0,
    ) -> None:
        """Start the module as an offset detector (in place), so stage 2 learns from the first
        updates instead of sitting on the plateau at loss ln(21) that the official
        initialisation gives (official issues #5, #19; days of GPU training in the paper).

        The offset is a second-order quantity (which visual segment matches an audio segment,
        and how far away it lies), and at a small random init every path that carries it is a
        product of near-zero matrices, hence the plateau. Here the module starts as the match
        score of each class: how well the audio segments match the visual segments
        ``class_shifts[c]`` segments away, averaged over the audio segments whose partner lies
        in the window. With matching features from stage 1 this is already a good detector;
        training then improves on it. The circuit, in the channels of :meth:`aligned_channels`
        (the content channels hold the projected features, centred, see
        ``SynchformerNet.init_aligned``):

        - position embedding: the modality sign, the one-hot segment index of every visual and
          audio token, a flag on the OFF token; the OFF and MOD tokens start at zero;
        - block 0, head 0: audio tokens attend to the visual tokens with a softmax over their
          feature similarity (``match_sharpness``: inverse temperature on the cosine), the
          modality term keeping them off their own stream; the value is the visual segment
          index, so each audio token receives the distribution ``p(s')`` of its matched
          visual segment;
        - block 0, MLP: one gated unit per (audio segment s, class c) whose partner
          ``s' = s + class_shifts[c]`` lies in the window: ``GELU(vote_gain * p(s'))`` when
          the token sits at segment s, ``~0`` otherwise (``gate_margin``), summed into the
          class's score channel (scaled so that every class averages over its own number of
          pairs); two more units per score channel remove ``p`` (``GELU(x) - GELU(-x) = x``);
        - block 1, head 0: the OFF token attends evenly to the audio tokens and copies the
          mean of their score channels;
        - offset head: ``head_gain`` times the score channel of each class.
        The input LayerNorms of the first two blocks see the same token statistics for every
        token of a stream, which the weights undo. Every residual branch outside the circuit
        starts at zero (its input weights keep the official init, so all of it trains).

        Args:
            content_dim: channels ``0 .. content_dim-1`` hold the content.
            class_shifts: per offset class, how many segments after an audio segment its
                visual partner lies (``offset / segment stride``: the grid step must equal the
                segment stride).
            visual_tokens_per_segment, audio_tokens_per_segment: tokens of a segment
                (consecutive, segment-major).
            match_sharpness, vote_gain, gate_margin, head_gain: see above.
            modality_code, modality_gain: value of the modality channel, and its weight in
                head 0's query/key (it must beat a token's match with itself).
            readout_gain: weight of the modality channel in block 1's key and of the OFF flag
                in its query.
        """
        num_classes = self.offset_head.out_features if self.offset_head is not None else 0
        if len(class_shifts) != num_classes:
            raise ValueError(f"class_shifts has {len(class_shifts)} entries for {num_classes} offset classes")
        streams = (  # name, first token, tokens, tokens per segment, modality sign
            ("visual", 1, self.num_visual_tokens, visual_tokens_per_segment, 1.0),
            ("audio", 2 + self.num_visual_tokens, self.num_audio_tokens, audio_tokens_per_segment, -1.0),
        )
        for name, _, count, tokens_per_segment, _ in streams:
            if count % tokens_per_segment:
                raise ValueError(f"{count} {name} tokens are not whole segments of {tokens_per_segment}")
        num_segments = self.num_visual_tokens // visual_tokens_per_segment
        if self.num_audio_tokens // audio_tokens_per_segment != num_segments:
            raise ValueError("the visual and audio tokens cover different numbers of segments")
        channels = self.aligned_channels(content_dim, num_segments)
        dim, segment, scores = self.dim, channels["segment"], channels["scores"]
        modality, off_flag = channels["modality"], channels["off_flag"]
        pairs = [(s, c, s + shift) for c, shift in enumerate(class_shifts)
                 for s in range(num_segments) if 0 <= s + shift < num_segments]
        num_scores = scores.stop - scores.start
        hidden = self.blocks[0].mlp.fc1.out_features
        if len(pairs) + 2 * num_scores > hidden:
            raise ValueError(
                f"the aligned sync init needs {len(pairs) + 2 * num_scores} MLP units for {num_segments} segments "
                f"and {num_classes} classes, the sync module has {hidden}: use fewer segments or a wider module"
            )

        # Every residual branch starts at zero; the circuit below writes its own entries.
        for block in self.blocks:
            for output in (block.attn.proj, block.mlp.fc2):
                output.weight.zero_()
                output.bias.zero_()
        self.off_token.zero_()
        self.mod_token.zero_()
        self.pos_embed.zero_()
        self.pos_embed[0, 0, off_flag] = modality_code
        for _, first_token, count, tokens_per_segment, sign in streams:
            token_index = torch.arange(count)
            self.pos_embed[0, first_token + token_index, modality] = sign * modality_code
            self.pos_embed[0, first_token + token_index, segment.start + token_index // tokens_per_segment] = 1.0

        def token_stats(channel_values):
            """(mean, std) LayerNorm sees on a token whose stream-normed content (sum of
            squares = dim, zero mean) is joined by ``channel_values`` in channels of their own."""
            mean = sum(channel_values) / dim
            return mean, (sum(value**2 for value in channel_values) / dim + 1.0 - mean**2) ** 0.5

        # block 0, head 0: audio queries find matching visual tokens and read their segment
        first = self.blocks[0].attn
        head_dim = dim // first.num_heads
        query, key, value = first.qkv.weight.split(dim)
        for projection in (query, key, value):
            projection[:head_dim].zero_()
        zero_head_biases(first, head=0)
        # either stream's input tokens (the modality sign does not change the spread)
        mean_visual, std_input = token_stats([modality_code, 1.0])
        compared = min(content_dim, head_dim - 1)
        content_gain = (match_sharpness * std_input**2 * head_dim**0.5 / dim) ** 0.5
        query[:compared, :compared] = content_gain * torch.eye(compared)
        key[:compared, :compared] = content_gain * torch.eye(compared)
        query[head_dim - 1, modality] = modality_gain
        key[head_dim - 1, modality] = -modality_gain
        value[:num_segments, segment] = torch.eye(num_segments)
        # the value sees (one-hot - mean) / std of LayerNorm: the projection undoes it, so an audio
        # token receives exactly p(s') in the first score channels
        first.proj.weight[scores.start:scores.start + num_segments, :num_segments] = std_input * torch.eye(num_segments)
        first.proj.bias[scores.start:scores.start + num_segments] = mean_visual

        # block 0, MLP: votes of each audio token for the classes, then drop the matched segment
        mlp = self.blocks[0].mlp
        mean_mlp, std_mlp = token_stats([-modality_code, 1.0, 0.5, 0.5])  # matched segment: sum 1, sum of squares ~1/2
        pairs_per_class = Counter(c for _, c, _ in pairs)
        mlp.fc1.weight[: len(pairs) + 2 * num_scores].zero_()
        mlp.fc1.bias[: len(pairs) + 2 * num_scores].zero_()
        gate = vote_gain + gate_margin
        # on the token at segment s: vote_gain * p(partner); on any other: at most -gate_margin
        for unit, (s, c, partner) in enumerate(pairs):
            mlp.fc1.weight[unit, scores.start + partner] = vote_gain * std_mlp
            mlp.fc1.weight[unit, segment.start + s] = gate * std_mlp
            mlp.fc1.bias[unit] = -gate * (1.0 - mean_mlp) + vote_gain * mean_mlp
            mlp.fc2.weight[scores.start + c, unit] = num_segments / pairs_per_class[c]
        for index in range(num_scores):
            plus, minus = len(pairs) + 2 * index, len(pairs) + 2 * index + 1
            mlp.fc1.weight[plus, scores.start + index] = 1.0
            mlp.fc1.weight[minus, scores.start + index] = -1.0
            mlp.fc2.weight[scores.start + index, plus] = -std_mlp
            mlp.fc2.weight[scores.start + index, minus] = std_mlp
        mlp.fc2.bias[scores] = -mean_mlp

        # block 1, head 0: the OFF token averages the audio tokens' class scores
        second = self.blocks[1].attn
        query, key, value = second.qkv.weight.split(dim)
        for projection in (query, key, value):
            projection[:head_dim].zero_()
        zero_head_biases(second, head=0)
        query[0, off_flag] = readout_gain
        key[0, modality] = -readout_gain  # audio tokens score high, visual ones low, OFF and MOD zero
        value[:num_scores, scores] = torch.eye(num_scores)
        second.proj.weight[scores, :num_scores] = std_mlp * torch.eye(num_scores)

        self.offset_head.weight.zero_()
        self.offset_head.bias.zero_()
        self.offset_head.weight[:, scores.start:scores.start + num_classes] = head_gain * torch.eye(num_classes)

    def encode(self, visual: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """
        Args:
            visual: (B, Nv, D) projected visual tokens, segment-major.
            audio: (B, Na, D) projected audio tokens, segment-major.
        Returns:
            (B, 2 + Nv + Na, D) final-normed tokens, OFF first.
        """
        expected = (self.num_visual_tokens, self.num_audio_tokens)
        if (visual.shape[1], audio.shape[1]) != expected:
            raise ValueError(
                f"the sync module was built for (visual, audio) = {expected} tokens, got "
                f"{(visual.shape[1], audio.shape[1])}: check the number of segments"
            )
        batch = visual.shape[0]
        x = torch.cat(
            (
                self.off_token.expand(batch, -1, -1),
                self.visual_norm(visual),
                self.mod_token.expand(batch, -1, -1),
                self.audio_norm(audio),
            ),
            dim=1,
        )
        x = self.embed_dropout(x + self.pos_embed)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def heads(self, tokens: torch.Tensor) -> Dict[str, torch.Tensor]:
        """tokens: (B, N, D) from :meth:`encode` -> ``offset_logits (B, n_offsets)`` and/or
        ``sync_logits (B, 2)``, both read from the OFF token."""
        off = tokens[:, 0]
        out: Dict[str, torch.Tensor] = {}
        if self.offset_head is not None:
            out["offset_logits"] = self.offset_head(off)
        if self.sync_head is not None:
            out["sync_logits"] = self.sync_head(off)
        return out

    def forward(self, visual: torch.Tensor, audio: torch.Tensor) -> Dict[str, torch.Tensor]:
        """(B, Nv, D), (B, Na, D) -> dict of logits (see :meth:`heads`)."""
        return self.heads(self.encode(visual, audio))

