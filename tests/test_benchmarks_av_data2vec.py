"""The AV-data2vec benchmarks' measuring parts: the EMA teacher keeps no activations for
backward, FLOP counting, raw PyAV decoding of a window equals the project's reader, tables."""
import os
import sys

import numpy as np
import pytest
import torch
from fairseq import models
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

import avplugins  # noqa: F401  (registers the plugin)
from avplugins.data.media import read_video, write_video

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from _bench_utils_d2v import format_table, matmul_flops  # noqa: E402
from av_data2vec_pretrain import saved_activation_bytes  # noqa: E402
from data_loading import raw_decode_video  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_pretraining_batch(steps=16, size=24):
    generator = torch.Generator().manual_seed(0)
    return {
        "audio": torch.randn(2, steps, 104, generator=generator),
        "video": torch.randn(2, 1, steps, size, size, generator=generator),
        "padding_mask": torch.zeros(2, steps, dtype=torch.bool),
    }


def test_teacher_forward_keeps_no_activations_for_backward():
    torch.manual_seed(0)
    model = models.build_model(OmegaConf.create({"_name": "av_data2vec_tiny", "encoder_layerdrop": 0.0}), None)
    model.train()
    model.set_num_updates(0)
    batch = tiny_pretraining_batch()
    audio_only = torch.ones(2, dtype=torch.bool)
    with saved_activation_bytes() as teacher_saved:
        targets = model.compute_targets(batch["audio"], batch["video"], batch["padding_mask"], None,
                                        audio_only, ~audio_only)
    with saved_activation_bytes() as student_saved:
        student = model.backbone(batch["audio"], batch["video"], batch["padding_mask"])
    assert teacher_saved["bytes"] == 0
    assert not targets.requires_grad and targets.grad_fn is None
    # the counter does see what a graph keeps: the student's (B, T, D) activations and more
    assert student_saved["bytes"] > student["x"].numel() * 4 * len(model.backbone.encoder.blocks)


def test_flop_count_convention_is_two_per_multiply_add():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    with FlopCounterMode(display=False) as counter:
        torch.mm(a, b)
    assert counter.get_total_flops() == matmul_flops(8, 16, 4) == 2 * 8 * 16 * 4


def test_raw_pyav_window_equals_the_project_reader(tmp_path):
    frames = np.random.default_rng(0).integers(0, 255, size=(20, 32, 32), dtype=np.uint8)
    path = tmp_path / "clip.mp4"
    write_video(path, frames, fps=25)
    raw = raw_decode_video(str(path), start_s=0.2, end_s=0.6, gray=True)
    reference = read_video(path, start_s=0.2, duration_s=0.4, fps=25, gray=True)
    assert raw.shape == (10, 32, 32)
    np.testing.assert_array_equal(raw, reference)


def test_format_table_known_output():
    assert format_table(["a", "b"], [(1, 0.123456), ("x", "y")]) == "| a | b |\n|---|---|\n| 1 | 0.123 |\n| x | y |"
