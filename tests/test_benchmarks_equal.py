"""The optimised Synchformer modules equal the straightforward eager implementation of the
benchmarks (benchmarks/_eager_reference.py: unfused softmax attention, the CLS key concatenated
to every group, one segment at a time) on the same weights, in float64 to rounding error and
in float32 to float32 tolerance."""
import sys
from pathlib import Path

import pytest
import torch

from avplugins.modules.synchformer_net import SynchformerNet

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._eager_reference import EagerConfig, eager_features, eager_synchformer  # noqa: E402

HEADS = 4
CONFIG = EagerConfig(visual_heads=HEADS, audio_heads=HEADS, sync_heads=HEADS)


def tiny_net(segments=3):
    torch.manual_seed(0)
    net = SynchformerNet.build(
        num_segments=segments,
        visual_args=dict(image_size=48, num_frames=4, dim=32, depth=2, num_heads=HEADS),
        audio_args=dict(dim=32, depth=2, num_heads=HEADS),
        sync_args=dict(dim=32, depth=2, num_heads=HEADS),
    ).eval()
    # tokens, position embeddings and queries/keys large enough that attention is far from
    # uniform, so that a token attending to the wrong group shows
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.endswith(("token", "pos_embed", "temp_embed")):
                torch.nn.init.normal_(param)
            elif name.endswith("qkv.weight"):
                param.mul_(10)
    return net


def inputs(segments=3, dtype=torch.float32):
    generator = torch.Generator().manual_seed(1)
    video = torch.randn(2, segments, 4, 3, 48, 48, generator=generator, dtype=dtype)
    audio = torch.randn(2, segments, 1, 128, 66, generator=generator, dtype=dtype)
    return video, audio


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_model_equals_eager_reference(dtype, tolerance):
    net = tiny_net().to(dtype)
    weights = net.state_dict()
    video, audio = inputs(dtype=dtype)
    with torch.inference_mode():
        vfeats, afeats = net.forward_features(video, audio)
        logits = net.forward_head(vfeats, afeats)["offset_logits"]
        eager_vfeats, eager_afeats = eager_features(weights, video, audio, CONFIG)
        eager_logits = eager_synchformer(weights, video, audio, CONFIG)
    for ours, eager in ((vfeats, eager_vfeats), (afeats, eager_afeats), (logits, eager_logits)):
        assert ours.shape == eager.shape
        torch.testing.assert_close(ours, eager, rtol=0, atol=tolerance)


def test_eager_reference_sees_a_wrong_axis():
    """The comparison has teeth: swapping the divided attention's axes in the reference moves
    the visual features far beyond the tolerance."""
    from benchmarks import _eager_reference as eager

    net = tiny_net().double()
    video, audio = inputs(dtype=torch.float64)
    original = eager.divided_attention

    def swapped(w, name, x, heads, slots, axis):
        return original(w, name, x, heads, slots, "space" if axis == "time" else "time")

    with torch.inference_mode():
        vfeats = net.visual(video)
        eager.divided_attention = swapped
        try:
            wrong, _ = eager_features(net.state_dict(), video, audio, CONFIG)
        finally:
            eager.divided_attention = original
    assert (vfeats - wrong).abs().max() > 100 * 2e-5, (vfeats - wrong).abs().max()
