"""Synchformer's fairseq glue on a hand-made corpus (dark clips with one flash and one beep at
the same moment): the datasets' segments and offsets (the beep moves by exactly the offset),
fixed offsets, synchronizability sampling, skipped broken files, decoded clips and cached
features equal to what they replace, both criteria against independent computations, the
recipes' learning-rate schedule, and stage 2 through fairseq (frozen stage-1 towers,
``fairseq-hydra-train``'s entry point, ``fairseq-validate``, ``avplugins.load_model``)."""
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import avplugins
from avplugins.convert.cli import fairseq_checkpoint, fairseq_config, save_checkpoint
from avplugins.criterions.av_sync_offset import (
    SYNC_SCORE_BINS,
    AVSyncOffsetCriterion,
    offset_hits,
    roc_auc_from_histograms,
    score_histograms,
)
from avplugins.criterions.segment_infonce import segment_infonce
from avplugins.data.manifest import write_manifest
from avplugins.data.media import MediaError, write_audio, write_video
from avplugins.data.sync_dataset import (
    AVOffsetDataset,
    AVSegmentDataset,
    ClipSamplingConfig,
    FixedOffset,
    write_fixed_offsets,
)
from avplugins.data.sync_feature_cache import (
    CacheMeta,
    CachedOffsetDataset,
    DecodedClips,
    FeatureCache,
    build_feature_cache,
    tower_fingerprint,
    write_decoded_clips,
)
from avplugins.data.sync_sampling import SegmentLayout, offset_grid, offset_to_class

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "examples" / "synchformer" / "conf"
USER_DIR = os.path.dirname(avplugins.__file__)
FPS, SR, SIZE = 25, 16000, 32
CLIP_S = 10.0
FLASH_S = {"train": [4.0, 4.8, 5.6, 6.0], "valid": [4.4, 5.2, 6.0], "test": [4.8, 5.6]}
BEEP_S = 0.08
# valid/test: (offset, video crop start) per clip; the flash and the beep stay inside both crops
FIXED = {"valid": [(-0.8, 2.0), (0.0, 2.4), (1.2, 2.8)], "test": [(0.4, 2.4), (-1.6, 3.0)]}
STAGE2_LAYOUT = SegmentLayout(num_segments=14, segment_frames=16, stride_frames=8)
TINY_STAGE2_LAYOUT = SegmentLayout(num_segments=21, segment_frames=16, stride_frames=5)  # sync/tiny_synthetic.yaml
TINY_TOWERS = {"video_tubelet_size": 16, "audio_patch_size": 64, "audio_stride": 64}


def flash_clip(flash_s: float, seed: int):
    """Dark 32 x 32 frames with a 2-frame flash at ``flash_s`` and quiet noise with an 80 ms
    1 kHz beep starting at ``flash_s``: uint8 (T, H, W), float32 (N,)."""
    frames = np.full((int(CLIP_S * FPS), SIZE, SIZE), 30, np.uint8)
    first = round(flash_s * FPS)
    frames[first:first + 2] = 220
    audio = np.random.default_rng(seed).normal(0, 1e-3, int(CLIP_S * SR)).astype(np.float32)
    start = round(flash_s * SR)
    time_s = np.arange(int(BEEP_S * SR)) / SR
    audio[start:start + len(time_s)] += 0.5 * np.sin(2 * np.pi * 1000 * time_s).astype(np.float32)
    return frames, audio


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("flash_corpus")
    (root / "clips").mkdir()
    for split, flashes in FLASH_S.items():
        rows = []
        for number, flash_s in enumerate(flashes):
            clip_id = f"{split}{number}"
            frames, audio = flash_clip(flash_s, seed=number)
            # media in a subfolder: fairseq refuses data folders with files named like valid1.*
            write_video(root / "clips" / f"{clip_id}.mp4", frames, FPS)
            write_audio(root / "clips" / f"{clip_id}.wav", audio, SR)
            rows.append((clip_id, f"clips/{clip_id}.mp4", f"clips/{clip_id}.wav", len(frames), len(audio)))
        write_manifest(str(root / f"{split}.tsv"), ".", rows)
    for split, fixed in FIXED.items():
        write_fixed_offsets(
            str(root / f"{split}_offsets.csv"),
            {f"{split}{number}": FixedOffset(*values) for number, values in enumerate(fixed)},
        )
    return root


def sampling(layout, **overrides):
    return ClipSamplingConfig(layout=layout, crop_size=SIZE, **overrides)


def offset_dataset(corpus, split, layout=STAGE2_LAYOUT, **kwargs):
    fixed = {f"{split}{n}": FixedOffset(*values) for n, values in enumerate(FIXED[split])} if split in FIXED else None
    return AVOffsetDataset(str(corpus / f"{split}.tsv"), sampling(layout), train=split == "train",
                           fixed_offsets=fixed, **kwargs)


def flash_time(video: torch.Tensor, stride_s: float) -> float:
    """Seconds from the first segment's start to the brightest frame; video (S, T, 3, H, W)."""
    brightness = video.mean(dim=(2, 3, 4))  # (S, T)
    segment, frame = np.unravel_index(int(brightness.argmax()), brightness.shape)
    return segment * stride_s + frame / FPS


def beep_onset(audio: torch.Tensor, stride_s: float) -> float:
    """Seconds from the first segment's start to the beep's first loud spectrogram frame
    (10 ms hop); audio (S, 1, 128, 66). Onsets seen at a segment's first frame began earlier."""
    loudness = audio[:, 0].amax(dim=1)[:, :65].numpy()  # (S, frames)
    threshold = 0.5 * (loudness.max() + loudness.min())
    onsets = [segment * stride_s + int(np.argmax(row > threshold)) * 0.01
              for segment, row in enumerate(loudness) if (row > threshold).any()
              and (segment == 0 or not row[0] > threshold)]
    return min(onsets)


# ----------------------------------------------------------------------------- datasets


def test_stage1_segments_are_aligned_and_shaped(corpus):
    layout = SegmentLayout(num_segments=8, segment_frames=16, stride_frames=16)
    dataset = AVSegmentDataset(str(corpus / "valid.tsv"), sampling(layout), train=False)
    for index in range(len(dataset)):
        item = dataset[index]
        assert item["video"].shape == (8, 16, 3, SIZE, SIZE) and item["audio"].shape == (8, 1, 128, 66)
        assert item["offset_target"] == 0 and item["sync_target"] == 1
        # centred window: the flash and the beep at the same moment
        assert beep_onset(item["audio"], 0.64) == pytest.approx(flash_time(item["video"], 0.64), abs=0.02)
    train = AVSegmentDataset(str(corpus / "train.tsv"), sampling(layout, audio_jitter_s=0.05), train=True)
    item = train[1]
    # training: the audio may be jittered by up to 0.05 s
    assert abs(beep_onset(item["audio"], 0.64) - flash_time(item["video"], 0.64)) <= 0.05 + 0.02


def test_fixed_offsets_are_honoured_and_move_the_audio_by_the_offset(corpus):
    dataset = offset_dataset(corpus, "valid")
    grid = offset_grid()
    batch = dataset.collater([dataset[index] for index in range(len(dataset))])
    assert batch["net_input"]["video"].shape == (3, 14, 16, 3, SIZE, SIZE)
    assert batch["net_input"]["audio"].shape == (3, 14, 1, 128, 66)
    for index, (offset_s, video_start_s) in enumerate(FIXED["valid"]):
        assert batch["offset_s"][index] == pytest.approx(offset_s)
        assert batch["target"][index] == offset_to_class(offset_s, grid)
        video, audio = batch["net_input"]["video"][index], batch["net_input"]["audio"][index]
        flash_s = flash_time(video, 0.32)
        # the video segments start 2 frames into the crop (test-time centring of 120 in 125 frames)
        assert flash_s == pytest.approx(FLASH_S["valid"][index] - video_start_s - 2 / FPS, abs=1e-6)
        # a positive offset starts the audio crop later, so the beep comes earlier in it
        assert beep_onset(audio, 0.32) == pytest.approx(flash_s - offset_s, abs=0.02)


def test_training_offsets_are_grid_classes_and_move_the_audio(corpus):
    dataset = offset_dataset(corpus, "train")
    grid = offset_grid()
    for epoch in (1, 2):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            item = dataset[index]
            assert item["offset_s"] in grid and grid[item["offset_target"]] == item["offset_s"]
            video_in_crop = FLASH_S["train"][index] - item["offset_s"]
            if flash_time(item["video"], 0.32) > 0.1 and 0.1 < video_in_crop:
                assert abs(beep_onset(item["audio"], 0.32) - (flash_time(item["video"], 0.32) - item["offset_s"])) \
                    <= 0.05 + 0.02


def test_synchronizability_draws_half_unsynchronizable_offsets(corpus):
    layout = SegmentLayout(num_segments=13, segment_frames=16, stride_frames=8)
    dataset = AVOffsetDataset(str(corpus / "train.tsv"), sampling(layout), train=True, synchronizability=True)
    grid = set(offset_grid().tolist())
    windows = [dataset.sample_window(index % len(dataset), np.random.default_rng(index)) for index in range(600)]
    unsynchronizable = [w for w in windows if not w.synchronizable]
    # 600 fair coin flips: 0.5 +- 4 standard deviations (0.082)
    assert abs(len(unsynchronizable) / len(windows) - 0.5) < 0.082
    assert {w.offset_s for w in unsynchronizable} == {-4.48, 4.48}
    assert all(w.offset_s in grid for w in windows if w.synchronizable)


def test_skip_invalid_counts_a_broken_file(corpus, tmp_path):
    (tmp_path / "broken.mp4").write_bytes(b"this is not a video" * 100)
    write_manifest(str(tmp_path / "mixed.tsv"), str(corpus), [
        ("good", "clips/valid0.mp4", "clips/valid0.wav", 250, 160000),
        ("broken", str(tmp_path / "broken.mp4"), "clips/valid0.wav", 250, 160000),
    ])
    layout = SegmentLayout(num_segments=8, segment_frames=16, stride_frames=16)
    strict = AVSegmentDataset(str(tmp_path / "mixed.tsv"), sampling(layout), train=False)
    with pytest.raises(MediaError, match="broken.mp4"):
        strict[1]
    lenient = AVSegmentDataset(str(tmp_path / "mixed.tsv"), sampling(layout, skip_invalid=True), train=False)
    assert lenient[1] is None and lenient.num_skipped == 1
    batch = lenient.collater([lenient[0], lenient[1]])
    assert batch["nsentences"] == 1 and batch["net_input"]["video"].shape[0] == 1
    assert lenient.collater([None]) == {}


def test_decoded_clips_give_the_same_items_as_decoding_files(corpus, tmp_path):
    reader = offset_dataset(corpus, "valid")
    assert write_decoded_clips(reader, str(tmp_path), "valid") == []
    sliced = offset_dataset(corpus, "valid", decoded_clips=DecodedClips(str(tmp_path), "valid"))
    for index in range(len(reader)):
        expected, got = reader[index], sliced[index]
        assert torch.equal(expected["video"], got["video"]) and torch.equal(expected["audio"], got["audio"])


# ----------------------------------------------------------------------------- criteria


def infonce_float64(video, audio, temperature):
    """Symmetric InfoNCE summed over rows, one row at a time in float64."""
    video, audio = video.double().numpy(), audio.double().numpy()
    total = 0.0
    for row in range(len(video)):
        for queries, keys in ((video, audio), (audio, video)):
            logits = keys @ queries[row] / temperature
            total += 0.5 * (np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[row])
    return total


def unit_rows(rows, dim, seed):
    return torch.nn.functional.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_infonce_matches_float64_computation():
    video, audio = unit_rows(12, 8, 0), unit_rows(12, 8, 1)
    audio[:4] = video[:4]  # some rows retrieve their positive
    loss, correct_v2a, correct_a2v = segment_infonce(video, audio, torch.tensor(0.1))
    assert loss.item() == pytest.approx(infonce_float64(video, audio, 0.1), rel=1e-5)
    similarity = (video @ audio.T).numpy()
    assert correct_v2a == int((similarity.argmax(1) == np.arange(12)).sum()) >= 4
    assert correct_a2v == int((similarity.argmax(0) == np.arange(12)).sum()) >= 4


def test_gathered_negatives_of_two_workers_add_up_to_the_whole_batch():
    video, audio = unit_rows(10, 6, 2), unit_rows(10, 6, 3)
    whole, v2a, a2v = segment_infonce(video, audio, torch.tensor(0.2))
    parts = [
        segment_infonce(video[rows], audio[rows], torch.tensor(0.2), video, audio, first_positive=rows.start)
        for rows in (slice(0, 5), slice(5, 10))
    ]
    assert sum(part[0].item() for part in parts) == pytest.approx(whole.item(), rel=1e-6)
    assert sum(part[1] for part in parts) == v2a and sum(part[2] for part in parts) == a2v
    local_only = sum(segment_infonce(video[r], audio[r], torch.tensor(0.2))[0].item() for r in (slice(0, 5), slice(5, 10)))
    assert local_only < whole.item()  # fewer negatives, smaller loss: gathering changes the task


def test_offset_hits_match_a_direct_count():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 21, generator=generator)
    target = torch.randint(0, 21, (200,), generator=generator)
    hits = offset_hits(logits, target)
    predicted = logits.numpy().argmax(1)
    ranks = np.argsort(-logits.numpy(), axis=1)
    assert hits["correct_1"] == int((predicted == target.numpy()).sum())
    assert hits["correct_1_tol"] == int((np.abs(predicted - target.numpy()) <= 1).sum())
    assert hits["correct_5"] == sum(int(t in r[:5]) for t, r in zip(target.numpy(), ranks))
    # predictions at the grid ends, one class off; the 5 best are the 3 nearest classes and beyond
    peaked = -(torch.arange(21.0)[None] - torch.tensor([[0.0], [20.0]])).abs()
    assert offset_hits(peaked, torch.tensor([1, 19])) == {"correct_1": 0, "correct_1_tol": 2, "correct_5": 2}
    assert offset_hits(peaked, torch.tensor([2, 15])) == {"correct_1": 0, "correct_1_tol": 0, "correct_5": 1}


def test_roc_auc_from_histograms_matches_pairwise_count_and_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    # scores at bin centres: the histogram keeps their order exactly
    bins = rng.integers(0, SYNC_SCORE_BINS, 400)
    bins[labels == 1] = np.minimum(bins[labels == 1] + SYNC_SCORE_BINS // 5, SYNC_SCORE_BINS - 1)
    scores = (bins + 0.5) / SYNC_SCORE_BINS
    auc = roc_auc_from_histograms(score_histograms(torch.tensor(scores), torch.tensor(labels)))
    positives, negatives = scores[labels == 1], scores[labels == 0]
    pairwise = ((positives[:, None] > negatives[None]) + 0.5 * (positives[:, None] == negatives[None])).mean()
    assert auc == pytest.approx(pairwise, abs=1e-12)
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    assert auc == pytest.approx(sklearn_metrics.roc_auc_score(labels, scores), abs=1e-12)


class FixedLogits(torch.nn.Module):
    def __init__(self, outputs):
        super().__init__()
        self.outputs = outputs

    def forward(self, **unused):
        return self.outputs


def test_offset_criterion_metrics_aggregate_over_batches():
    from fairseq.logging import metrics

    generator = torch.Generator().manual_seed(1)
    batches = []
    for size in (7, 9):
        offset_logits = torch.randn(size, 21, generator=generator)
        sync_logits = torch.randn(size, 2, generator=generator)
        batches.append((offset_logits, sync_logits, torch.randint(0, 21, (size,), generator=generator),
                        torch.randint(0, 2, (size,), generator=generator)))
    criterion = AVSyncOffsetCriterion(task=None)
    logs = []
    for offset_logits, sync_logits, target, sync_target in batches:
        model = FixedLogits({"offset_logits": offset_logits, "sync_logits": sync_logits})
        loss, sample_size, log = criterion(model, {"net_input": {}, "target": target, "sync_target": sync_target})
        synchronizable = sync_target.bool()
        expected = (torch.nn.functional.cross_entropy(offset_logits[synchronizable], target[synchronizable], reduction="sum")
                    + torch.nn.functional.cross_entropy(sync_logits, sync_target, reduction="sum"))
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6) and sample_size == len(target)
        logs.append(log)
    with metrics.aggregate() as aggregated:
        AVSyncOffsetCriterion.reduce_metrics(logs)
        values = aggregated.get_smoothed_values()
    offset_logits = torch.cat([b[0][b[3].bool()] for b in batches])
    target = torch.cat([b[2][b[3].bool()] for b in batches])
    predicted = offset_logits.argmax(1)
    assert values["accuracy_1"] == pytest.approx(round((predicted == target).float().mean().item(), 4))
    assert values["accuracy_1_tol"] == pytest.approx(round(((predicted - target).abs() <= 1).float().mean().item(), 4))
    sync_logits = torch.cat([b[1] for b in batches])
    sync_target = torch.cat([b[3] for b in batches])
    assert values["sync_accuracy"] == pytest.approx(round((sync_logits.argmax(1) == sync_target).float().mean().item(), 4))
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    scores = sync_logits.softmax(-1)[:, 1].numpy()
    assert values["sync_roc_auc"] == pytest.approx(sklearn_metrics.roc_auc_score(sync_target.numpy(), scores), abs=0.01)


# ----------------------------------------------------------------------------- recipes


def compose_recipe(stage: str, name: str, overrides):
    """The recipe ``conf/{stage}/{name}.yaml`` composed as ``fairseq-hydra-train`` does."""
    from fairseq.dataclass.initialize import hydra_init
    from hydra import compose, initialize_config_dir

    hydra_init(name)
    with initialize_config_dir(config_dir=str(CONF / stage), version_base=None):
        return compose(config_name=name, overrides=list(overrides))


PAPER_RECIPES = [("pretrain", name) for name in ("lrs3", "vggsound", "audioset", "tiny_synthetic")] + [
    ("sync", name) for name in ("lrs3", "vggsound", "audioset", "synchronizability_audioset", "tiny_synthetic")
]


def recipe_files(stage: str, name: str):
    """The recipe merged with the files of its defaults list, in that list's order (what the
    user reads; fairseq's schema defaults left out)."""
    from omegaconf import OmegaConf

    primary = OmegaConf.load(CONF / stage / f"{name}.yaml")
    order = list(primary.pop("defaults", ["_self_"]))
    parts = [primary if entry == "_self_" else OmegaConf.load(CONF / stage / f"{entry}.yaml") for entry in order]
    return OmegaConf.merge(*parts)


@pytest.mark.parametrize("stage,name", PAPER_RECIPES)
def test_recipes_list_every_key_a_user_sets(stage, name, tmp_path):
    from omegaconf import OmegaConf

    written = recipe_files(stage, name)
    required = [("task", "data"), ("checkpoint", "save_dir"), ("common", "user_dir")]
    if stage == "sync":
        required.append(("model", "pretrained_towers"))
    assert all(OmegaConf.is_missing(written[group], key) for group, key in required)
    # composing with every required key given works (a key missing from the yaml would fail here)
    cfg = compose_recipe(stage, name, [f"{group}.{key}={tmp_path}" for group, key in required])
    assert cfg.dataset.required_batch_size_multiple == 1 and cfg.task.data == str(tmp_path)
    assert cfg.optimization.clip_norm == 1.0
    if stage == "sync":
        assert cfg.checkpoint.maximize_best_checkpoint_metric and cfg.checkpoint.patience > 0
        assert cfg.optimizer.adam_eps == 1e-7 and cfg.lr_scheduler._name == "tri_stage"
        assert cfg.optimizer.adam_betas == "(0.9,0.999)" and cfg.optimizer.weight_decay == 0
        assert cfg.task.num_offset_classes == 21
        # the paper's batch per GPU; the tiny recipe uses 32 clips
        assert cfg.dataset.batch_size == (32 if name == "tiny_synthetic" else 16)
    if name != "tiny_synthetic":
        assert cfg.task.crop_size == 224 and cfg.task.resize_short_side == 256
        if stage == "sync":
            # 2e-6 x world size
            assert cfg.optimization.lr[0] == pytest.approx(2e-6 * cfg.distributed_training.distributed_world_size)
            assert cfg.lr_scheduler.warmup_steps == 1000
        else:
            assert cfg.optimization.lr[0] == (5e-5 if name == "lrs3" else 1e-4)
            assert cfg.lr_scheduler.warmup_updates == 1000 and cfg.optimizer.weight_decay == 0


def test_sync_recipe_warms_up_from_one_hundredth_then_stays_constant():
    from fairseq.dataclass.initialize import add_defaults
    from fairseq.optim import build_optimizer
    from fairseq.optim.lr_scheduler import build_lr_scheduler

    cfg = compose_recipe("sync", "lrs3", ["optimization.max_update=100000"])
    add_defaults(cfg)
    optimizer = build_optimizer(cfg.optimizer, [torch.nn.Parameter(torch.zeros(1))])
    scheduler = build_lr_scheduler(cfg.lr_scheduler, optimizer)
    peak = cfg.optimization.lr[0]
    lrs = {step: scheduler.step_update(step) for step in (0, 500, 1000, 5000, 99999)}
    assert lrs[0] == pytest.approx(peak / 100)
    assert lrs[500] == pytest.approx(peak / 100 + 0.5 * (peak - peak / 100))
    assert lrs[1000] == lrs[5000] == lrs[99999] == pytest.approx(peak)


# ----------------------------------------------------------------------------- stage 2 in fairseq


@pytest.fixture(scope="module")
def stage1_checkpoint(corpus, tmp_path_factory):
    """A tiny stage-1 checkpoint (random towers) for the corpus' frame size, written as the
    trainer writes one."""
    from fairseq import models, tasks
    from omegaconf import OmegaConf

    cfg = fairseq_config(
        "synchformer_segment_clip_tiny", "av_sync_pretraining", "segment_infonce",
        model_overrides=TINY_TOWERS,
        task_overrides={"data": str(corpus), "crop_size": SIZE, "num_segments": 8, "segment_stride_frames": 16},
    )
    task = tasks.setup_task(OmegaConf.create(cfg).task)
    torch.manual_seed(0)
    model = models.build_model(OmegaConf.create(cfg).model, task)
    path = tmp_path_factory.mktemp("stage1") / "stage1.pt"
    save_checkpoint(fairseq_checkpoint(cfg, model.state_dict()), str(path))
    return path, {k: v.clone() for k, v in model.state_dict().items()}


def sync_overrides(corpus, checkpoint, save_dir, *extra):
    return [f"task.data={corpus}", f"model.pretrained_towers={checkpoint}", f"checkpoint.save_dir={save_dir}",
            f"common.user_dir={USER_DIR}", "task.resize_short_side=null", *extra]


def test_stage2_takes_frozen_towers_from_stage1_through_an_update(corpus, stage1_checkpoint, tmp_path):
    from fairseq.dataclass.initialize import add_defaults
    from fairseq.trainer import Trainer
    from omegaconf import OmegaConf

    path, stage1_state = stage1_checkpoint
    cfg = compose_recipe("sync", "tiny_synthetic", sync_overrides(corpus, path, tmp_path))
    add_defaults(cfg)
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    from fairseq import tasks

    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    for key, value in model.state_dict().items():
        if key.startswith(("net.visual.", "net.audio.")):
            assert torch.equal(value, stage1_state[key]), key
    trainer = Trainer(cfg, task, model, criterion)
    task.load_dataset("train")
    dataset = task.dataset("train")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train_step([dataset.collater([dataset[0], dataset[1]])])
    assert model.training and not model.net.visual.training and not model.net.audio.training
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(("net.sync.", "net.vproj.", "net.aproj.")) for k in changed)
    towers = [p for name, p in model.named_parameters() if name.startswith(("net.visual.", "net.audio."))]
    assert towers and all(not p.requires_grad and p.grad is None for p in towers)


def test_stage2_refuses_towers_built_differently(corpus, stage1_checkpoint, tmp_path):
    from fairseq import tasks

    path, _ = stage1_checkpoint
    cfg = compose_recipe("sync", "tiny_synthetic", sync_overrides(corpus, path, tmp_path, "+model.video_dim=32"))
    task = tasks.setup_task(cfg.task)
    with pytest.raises(ValueError, match="model.video_dim=32 \\(checkpoint: 64\\)"):
        task.build_model(cfg.model)


def test_feature_cache_train_validate_and_load_model(corpus, stage1_checkpoint, tmp_path):
    """Cache features, train 2 updates on them with fairseq's trainer, then evaluate the saved
    model on decoded clips with ``fairseq-validate`` (stage-1 file gone) and ``load_model``."""
    from fairseq_cli.hydra_train import _hydra_main

    path, _ = stage1_checkpoint
    stage1 = avplugins.load_model(str(path))
    layout = SegmentLayout(num_segments=1, segment_frames=16, stride_frames=16)
    meta = CacheMeta(16, FPS, SR, SIZE, None, tower_fingerprint(stage1.net.visual, stage1.net.audio), str(path),
                     stage1.net.visual.tokens_per_segment, 64, stage1.net.audio.tokens_per_segment, 64)
    cache = tmp_path / "cache"
    for split in ("train", "valid"):
        reader = AVOffsetDataset(str(corpus / f"{split}.tsv"), sampling(layout), train=False,
                                 fixed_offsets={f"{split}{n}": FixedOffset(0.0, 0.0) for n in range(4)})
        assert build_feature_cache(stage1.net.visual, stage1.net.audio, reader, str(cache), split, meta,
                                   batch_segments=64) == []
    # cached rows are the towers' outputs on the same windows (to float16 precision)
    decoded = offset_dataset(corpus, "valid", TINY_STAGE2_LAYOUT)
    cached = CachedOffsetDataset(
        str(corpus / "valid.tsv"), sampling(TINY_STAGE2_LAYOUT), train=False, cache=FeatureCache(str(cache), "valid"),
        fixed_offsets=decoded.fixed_offsets)
    item, cached_item = decoded[2], cached[2]
    with torch.no_grad():
        vfeats, afeats = stage1.net.forward_features(item["video"][None], item["audio"][None])
    torch.testing.assert_close(cached_item["vfeats"], vfeats[0], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(cached_item["afeats"], afeats[0], atol=2e-3, rtol=2e-3)
    assert cached_item["offset_target"] == item["offset_target"]

    run = tmp_path / "run"
    cfg = compose_recipe("sync", "tiny_synthetic", sync_overrides(
        corpus, path, run, f"task.feature_cache={cache}", "optimization.max_update=2", "common.log_interval=1",
        "dataset.batch_size=2", "checkpoint.save_interval_updates=2"))
    torch.set_num_threads(1)
    _hydra_main(cfg)
    checkpoint = run / "checkpoint_last.pt"
    assert checkpoint.is_file()
    moved = path.with_suffix(".moved")
    os.replace(path, moved)  # loading the stage-2 checkpoint must not need the stage-1 file
    try:
        result = subprocess.run(
            [sys.executable, "-m", "fairseq_cli.validate", str(corpus), "--path", str(checkpoint), "--task", "av_sync",
             "--valid-subset", "test", "--user-dir", USER_DIR, "--batch-size", "2", "--cpu",
             "--model-overrides", "{'feature_cache': None}"],
            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        model = avplugins.load_model(str(checkpoint))
    finally:
        os.replace(moved, path)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "valid on 'test' subset" in log and "accuracy_1 " in log and "accuracy_1_tol" in log

    test = offset_dataset(corpus, "test", TINY_STAGE2_LAYOUT)
    batch = test.collater([test[0], test[1]])
    with torch.no_grad():
        output = model(video=batch["net_input"]["video"], audio=batch["net_input"]["audio"])
    assert output["offset_logits"].shape == (2, 21) and torch.isfinite(output["offset_logits"]).all()
    assert not model.training


def test_stage2_checkpoint_loads_without_running_its_aligned_init(corpus, tmp_path):
    """Loading builds the model before the checkpoint's weights replace it: the aligned init must
    not run then (this layout of an earlier tiny recipe, 27 segments 4 frames apart, is one it
    refuses now)."""
    from fairseq import models, tasks
    from omegaconf import OmegaConf

    def config(sync_init):
        return fairseq_config(
            "synchformer_tiny", "av_sync", "av_sync_offset", model_overrides={**TINY_TOWERS, "sync_init": sync_init},
            task_overrides={"data": str(corpus), "crop_size": SIZE, "num_segments": 27, "segment_stride_frames": 4},
        )

    official = OmegaConf.create(config("official"))
    torch.manual_seed(0)
    model = models.build_model(official.model, tasks.setup_task(official.task))
    path = tmp_path / "stage2.pt"
    save_checkpoint(fairseq_checkpoint(config("aligned"), model.state_dict()), str(path))
    loaded = avplugins.load_model(str(path))
    assert loaded.cfg.num_segments == 27
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
