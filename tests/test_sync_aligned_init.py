"""The aligned initialisation of the sync module (``SyncTransformer.init_aligned``): the module
it builds computes each offset class's match score (checked against a float64 recomputation),
and it learns a synthetic shift task (audio tokens = the visual tokens shifted by k, plus noise)
where the official initialisation plateaus."""
import pytest
import torch
import torch.nn.functional as F

from avplugins.modules.synchformer_net import SynchformerNet, init_feature_copy
from avplugins.modules.sync_transformer import SyncTransformer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEGMENTS, MAX_SHIFT, FEATURE_DIM, SYNC_DIM = 10, 3, 32, 128
CLASS_SHIFTS = list(range(-MAX_SHIFT, MAX_SHIFT + 1))


def shifted_pairs(batch: int, generator: torch.Generator, noise: float = 0.5):
    """Visual tokens (B, S, F) and audio tokens that are the same random sequence shifted by
    ``k`` tokens (audio token i shows visual time i + k), plus noise; returns (visual, audio, k)."""
    sequence = torch.randn(batch, SEGMENTS + 2 * MAX_SHIFT, FEATURE_DIM, generator=generator)
    shift = torch.randint(-MAX_SHIFT, MAX_SHIFT + 1, (batch,), generator=generator)
    visual = sequence[:, MAX_SHIFT:MAX_SHIFT + SEGMENTS]
    index = torch.arange(SEGMENTS)[None] + MAX_SHIFT + shift[:, None]
    audio = torch.gather(sequence, 1, index[..., None].expand(-1, -1, FEATURE_DIM))
    return visual, audio + noise * torch.randn(audio.shape, generator=generator), shift


def sync_module(init: str, visual_per_segment: int = 1, audio_per_segment: int = 1):
    torch.manual_seed(0)
    sync = SyncTransformer(SEGMENTS * visual_per_segment, SEGMENTS * audio_per_segment, dim=SYNC_DIM, depth=3,
                           num_heads=2, num_offset_classes=len(CLASS_SHIFTS), dropout=0.0, attn_dropout=0.0)
    vproj, aproj = torch.nn.Linear(FEATURE_DIM, SYNC_DIM), torch.nn.Linear(FEATURE_DIM, SYNC_DIM)
    if init == "aligned":
        for projection in (vproj, aproj):
            init_feature_copy(projection)
        sync.init_aligned(FEATURE_DIM, CLASS_SHIFTS, visual_per_segment, audio_per_segment)
    return sync, vproj, aproj


def match_scores(visual, audio, sharpness=3.0, vote_gain=4.0):
    """Float64 recomputation of what the aligned module starts as: per class c, the mean over the
    audio segments s whose partner s + shift_c is in the window of GELU(vote_gain * p_s(s + shift_c)),
    p_s = softmax over visual segments of sharpness * cosine(centred features)."""
    def centred(features):
        features = features.double()
        return F.normalize(features - features.mean(-1, keepdim=True), dim=-1)

    matched = torch.softmax(sharpness * centred(audio) @ centred(visual).transpose(1, 2), dim=-1)
    segment = torch.arange(SEGMENTS)
    scores = []
    for shift in CLASS_SHIFTS:
        inside = (segment + shift >= 0) & (segment + shift < SEGMENTS)
        scores.append(F.gelu(vote_gain * matched[:, segment[inside], segment[inside] + shift]).mean(-1))
    return torch.stack(scores, dim=-1)


def test_aligned_module_starts_as_the_match_score_of_each_class():
    sync, vproj, aproj = sync_module("aligned")
    visual, audio, shift = shifted_pairs(64, torch.Generator().manual_seed(0), noise=1.0)
    with torch.no_grad():
        logits = sync(vproj(visual), aproj(audio))["offset_logits"].double()
    reference = match_scores(visual, audio)
    # the final LayerNorm scales each clip's logits and shifts them by a constant: compare shapes
    logits = logits - logits.mean(-1, keepdim=True)
    reference = reference - reference.mean(-1, keepdim=True)
    for clip_logits, clip_reference in zip(logits, reference):
        assert torch.corrcoef(torch.stack((clip_logits, clip_reference)))[0, 1] > 0.99
    assert torch.equal(logits.argmax(-1), reference.argmax(-1))
    assert (logits.argmax(-1) == shift + MAX_SHIFT).float().mean() > 0.9


def test_aligned_init_reads_segments_of_several_tokens():
    visual_per_segment, audio_per_segment = 2, 3  # as the paper's towers: several tokens per segment
    generator = torch.Generator().manual_seed(3)
    visual, audio, shift = shifted_pairs(128, generator, noise=0.0)
    visual = visual.repeat_interleave(visual_per_segment, 1)
    audio = audio.repeat_interleave(audio_per_segment, 1)
    visual = visual + 0.5 * torch.randn(visual.shape, generator=generator)
    audio = audio + 0.5 * torch.randn(audio.shape, generator=generator)
    sync, vproj, aproj = sync_module("aligned", visual_per_segment, audio_per_segment)
    with torch.no_grad():
        predicted = sync(vproj(visual), aproj(audio))["offset_logits"].argmax(-1)
    assert (predicted == shift + MAX_SHIFT).float().mean() > 0.9


def test_aligned_init_learns_the_shift_where_the_official_init_plateaus():
    accuracy = {}
    for init in ("official", "aligned"):
        sync, vproj, aproj = sync_module(init)
        params = [*sync.parameters(), *vproj.parameters(), *aproj.parameters()]
        optimizer = torch.optim.Adam(params, lr=3e-4)
        generator = torch.Generator().manual_seed(1)
        for _ in range(250):
            visual, audio, shift = shifted_pairs(32, generator)
            logits = sync(vproj(visual), aproj(audio))["offset_logits"]
            loss = torch.nn.functional.cross_entropy(logits, shift + MAX_SHIFT)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        visual, audio, shift = shifted_pairs(256, torch.Generator().manual_seed(2))
        with torch.no_grad():
            predicted = sync(vproj(visual), aproj(audio))["offset_logits"].argmax(-1)
        accuracy[init] = (predicted == shift + MAX_SHIFT).float().mean().item()
    chance = 1 / (2 * MAX_SHIFT + 1)
    assert accuracy["aligned"] > 0.9, accuracy
    assert accuracy["official"] < 1.75 * chance, accuracy


def test_aligned_init_needs_room_for_its_channels():
    # 32 content + 2 + 4 segments + 4 scores = 42 channels
    sync = SyncTransformer(4, 4, dim=40, depth=2, num_heads=2, num_offset_classes=3)
    with pytest.raises(ValueError, match="sync_dim >= feature dim \\+ 2 \\+ segments.*\\(42\\).*sync_init=official"):
        sync.init_aligned(32, [-1, 0, 1])


def test_aligned_init_needs_mlp_units_for_every_pair():
    sync = SyncTransformer(12, 12, dim=64, depth=2, num_heads=2, mlp_ratio=1.0, num_offset_classes=11)
    with pytest.raises(ValueError, match="needs 126 MLP units for 12 segments and 11 classes, the sync module has 64"):
        sync.init_aligned(16, list(range(-5, 6)))


def test_aligned_init_needs_one_feature_width():
    net = SynchformerNet.build(
        num_segments=2,
        visual_args=dict(image_size=32, num_frames=16, tubelet_size=16, dim=32, depth=1, num_heads=2),
        audio_args=dict(patch_size=64, freq_stride=64, time_stride=64, dim=48, depth=1, num_heads=2),
        sync_args=dict(dim=64, depth=1, num_heads=2, num_offset_classes=3),
    )
    with pytest.raises(ValueError, match="one width for both towers, got 32 and 48"):
        net.init_aligned([-1, 0, 1])


def test_class_shifts_need_a_segment_stride_that_divides_the_grid_step():
    from types import SimpleNamespace

    from avplugins.models.synchformer import aligned_class_shifts

    grid = dict(max_offset_s=2.0, num_offset_classes=21, video_fps=25)
    assert aligned_class_shifts(SimpleNamespace(segment_stride_frames=5, **grid)) == list(range(-10, 11))
    assert aligned_class_shifts(SimpleNamespace(segment_stride_frames=1, **grid)) == list(range(-50, 51, 5))
    with pytest.raises(ValueError, match="grid step \\(0.2 s\\).*stride \\(4 frames = 0.16 s\\).*task.segment_stride_frames=5"):
        aligned_class_shifts(SimpleNamespace(segment_stride_frames=4, **grid))
