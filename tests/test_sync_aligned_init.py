"""The aligned initialisation of the sync module (``SyncTransformer.init_aligned``): a known-answer
check of the offset path it builds, and a learning test against the official initialisation on a
synthetic shift task (audio tokens = the visual tokens shifted by k, plus noise)."""
import pytest
import torch

from avplugins.modules.synchformer_net import SynchformerNet, init_feature_copy
from avplugins.modules.sync_transformer import SyncTransformer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEGMENTS, MAX_SHIFT, FEATURE_DIM, SYNC_DIM = 10, 3, 32, 64


def shifted_pairs(batch: int, generator: torch.Generator, noise: float = 0.5):
    """Visual tokens (B, S, F) and audio tokens that are the same random sequence shifted by
    ``k`` tokens (audio token i shows visual time i + k), plus noise; returns (visual, audio, k)."""
    sequence = torch.randn(batch, SEGMENTS + 2 * MAX_SHIFT, FEATURE_DIM, generator=generator)
    shift = torch.randint(-MAX_SHIFT, MAX_SHIFT + 1, (batch,), generator=generator)
    visual = sequence[:, MAX_SHIFT:MAX_SHIFT + SEGMENTS]
    index = torch.arange(SEGMENTS)[None] + MAX_SHIFT + shift[:, None]
    audio = torch.gather(sequence, 1, index[..., None].expand(-1, -1, FEATURE_DIM))
    return visual, audio + noise * torch.randn(audio.shape, generator=generator), shift


def sync_module(init: str):
    torch.manual_seed(0)
    sync = SyncTransformer(SEGMENTS, SEGMENTS, dim=SYNC_DIM, depth=3, num_heads=2,
                           num_offset_classes=2 * MAX_SHIFT + 1, dropout=0.0, attn_dropout=0.0)
    vproj, aproj = torch.nn.Linear(FEATURE_DIM, SYNC_DIM), torch.nn.Linear(FEATURE_DIM, SYNC_DIM)
    if init == "aligned":
        for projection in (vproj, aproj):
            init_feature_copy(projection)
        sync.init_aligned(FEATURE_DIM)
    return sync, vproj, aproj


def test_first_block_reads_each_audio_tokens_offset():
    sync, vproj, aproj = sync_module("aligned")
    visual, audio, shift = shifted_pairs(16, torch.Generator().manual_seed(0), noise=0.0)
    first_block_out = {}
    sync.blocks[0].register_forward_hook(lambda module, args, out: first_block_out.setdefault("x", out))
    with torch.no_grad():
        sync(vproj(visual), aproj(audio))
    channels = sync.aligned_channels(FEATURE_DIM)
    audio_tokens = first_block_out["x"][:, 2 + SEGMENTS:]
    estimate = audio_tokens[..., channels["attended_time"]] - audio_tokens[..., channels["audio_time"]]
    ramp_step = 2 * 2.0 / (SEGMENTS - 1)
    position = torch.arange(SEGMENTS)[None] + shift[:, None]
    matched = (position >= 0) & (position < SEGMENTS)
    expected = (shift[:, None] * ramp_step).expand_as(estimate)
    # the value passes through the block's LayerNorm, which rescales each token by about 1
    assert torch.corrcoef(torch.stack((estimate[matched], expected[matched])))[0, 1] > 0.95


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
    assert accuracy["aligned"] > 3.5 * chance, accuracy
    assert accuracy["official"] < 1.75 * chance, accuracy


def test_aligned_init_needs_room_for_its_channels():
    sync = SyncTransformer(4, 4, dim=34, depth=1, num_heads=2, num_offset_classes=3)
    with pytest.raises(ValueError, match="sync_dim >= feature dim \\+ 4 \\(36\\).*sync_init=official"):
        sync.init_aligned(32)


def test_aligned_init_needs_one_feature_width():
    net = SynchformerNet.build(
        num_segments=2,
        visual_args=dict(image_size=32, num_frames=16, tubelet_size=16, dim=32, depth=1, num_heads=2),
        audio_args=dict(patch_size=64, freq_stride=64, time_stride=64, dim=48, depth=1, num_heads=2),
        sync_args=dict(dim=64, depth=1, num_heads=2, num_offset_classes=3),
    )
    with pytest.raises(ValueError, match="one width for both towers, got 32 and 48"):
        net.init_aligned()
