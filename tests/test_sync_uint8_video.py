"""Synchformer's uint8 video items: the tasks' datasets hand over uint8 frames (stage 2: the clip's
unique frames plus a segment frame index) and the models normalise them on their device. The
towers must see exactly what the float items of the straightforward version gave them, through
the tasks, the collater, a DataLoader worker and both models."""
import dataclasses

import numpy as np
import pytest
import torch

from avplugins.convert.cli import fairseq_config
from avplugins.data import transforms as tr
from avplugins.data.manifest import write_manifest
from avplugins.data.media import write_audio, write_video
from avplugins.data.sync_dataset import AVOffsetDataset, AVSegmentDataset

FPS, SR, SIZE = 25, 16000, 32
TINY = {"video_tubelet_size": 8, "audio_patch_size": 64, "audio_stride": 64}
# stage 2: 4 segments of 8 frames every 4 frames (20 unique frames); stage 1: 2 of 8, no overlap
STAGE2 = {"crop_size": SIZE, "num_segments": 4, "segment_frames": 8, "segment_stride_frames": 4,
          "crop_s": 1.0, "max_offset_s": 0.4, "num_offset_classes": 5, "sometimes_upscale_p": 0.3}
STAGE1 = {"crop_size": SIZE, "num_segments": 2, "segment_frames": 8, "segment_stride_frames": 8,
          "sometimes_upscale_p": 0.3}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three 2.4 s clips of random 40 x 48 RGB frames and noise."""
    root = tmp_path_factory.mktemp("uint8_corpus")
    rows = []
    for number in range(3):
        generator = np.random.default_rng(number)
        frames = generator.integers(0, 256, (60, 40, 48, 3), dtype=np.uint8)
        audio = (0.2 * generator.standard_normal(int(2.4 * SR))).astype(np.float32)
        write_video(root / f"c{number}.mp4", frames, FPS)
        write_audio(root / f"c{number}.wav", audio, SR)
        rows.append((f"c{number}", f"c{number}.mp4", f"c{number}.wav", len(frames), len(audio)))
    write_manifest(str(root / "train.tsv"), ".", rows)
    return root


def task_and_model(model_name, task_name, criterion_name, task_overrides):
    from fairseq import models, tasks
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(fairseq_config(model_name, task_name, criterion_name, model_overrides=TINY,
                                          task_overrides=task_overrides))
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(0)
    model = models.build_model(cfg.model, task)
    model.eval()
    task.load_dataset("train")
    return task, model


def float_twin(dataset):
    """The same dataset (same manifest, settings and random draws) with float32 items."""
    config = dataclasses.replace(dataset.config, uint8_video=False)
    if isinstance(dataset, AVOffsetDataset):
        return AVOffsetDataset(dataset.manifest_path, config, dataset.train, crop_s=STAGE2["crop_s"],
                               max_offset_s=STAGE2["max_offset_s"], num_offset_classes=STAGE2["num_offset_classes"])
    return AVSegmentDataset(dataset.manifest_path, config, dataset.train)


def towers_input_and_output(model, net_input):
    """(video the towers were given, model output) of ``model(**net_input)``."""
    seen = []
    forward_features = model.net.forward_features

    def spy(video, audio):
        seen.append(video)
        return forward_features(video, audio)

    model.net.forward_features = spy
    try:
        with torch.no_grad():
            output = model(**net_input)
    finally:
        model.net.forward_features = forward_features
    return seen[0], output


def test_stage2_task_items_are_uint8_frames_and_the_model_sees_the_float_items(corpus):
    task, model = task_and_model("synchformer_tiny", "av_sync", "av_sync_offset", {"data": str(corpus), **STAGE2})
    dataset = task.dataset("train")
    reference = float_twin(dataset)
    for epoch in (1, 2):  # other crops, flips and offsets
        dataset.set_epoch(epoch)
        reference.set_epoch(epoch)
        item = dataset[0]
        # 20 unique frames of 32 x 32 instead of 4 x 8 float32 frames, laid out as decoded (H, W, 3)
        assert item["video"].dtype == torch.uint8 and item["video"].shape == (20, 3, SIZE, SIZE)
        assert item["video"].movedim(-3, -1).is_contiguous()
        assert torch.equal(item["video_frame_index"], torch.arange(8) + 4 * torch.arange(4)[:, None])
        assert reference[0]["video"].nbytes == 4 * 32 / 20 * item["video"].nbytes
        batch = dataset.collater([dataset[index] for index in range(3)])
        float_batch = reference.collater([reference[index] for index in range(3)])
        video = batch["net_input"]["video"]
        assert video.shape == (3, 20, 3, SIZE, SIZE) and video.movedim(-3, -1).is_contiguous()
        for key in ("target", "offset_s", "sync_target"):
            assert torch.equal(batch[key], float_batch[key]), key
        assert torch.equal(batch["net_input"]["audio"], float_batch["net_input"]["audio"])
        seen, output = towers_input_and_output(model, batch["net_input"])
        float_seen, float_output = towers_input_and_output(model, float_batch["net_input"])
        assert seen.dtype == torch.float32 and seen.is_contiguous()
        assert torch.equal(seen, float_batch["net_input"]["video"]) and torch.equal(seen, float_seen)
        assert torch.equal(seen, tr.normalize_rgb(video[:, item["video_frame_index"]].float() / 255.0))
        assert torch.equal(output["offset_logits"], float_output["offset_logits"])


@pytest.mark.parametrize("color_augment", [False, True])
def test_stage1_task_items_and_the_model_see_the_float_items(corpus, color_augment):
    task, model = task_and_model("synchformer_segment_clip_tiny", "av_sync_pretraining", "segment_infonce",
                                 {"data": str(corpus), **STAGE1, "color_augment": color_augment})
    dataset = task.dataset("train")
    reference = float_twin(dataset)
    item = dataset[1]
    # colour-distorted clips are floats: with colour augmentation the items stay float32
    assert item["video"].dtype == (torch.float32 if color_augment else torch.uint8)
    assert item["video"].shape == (2, 8, 3, SIZE, SIZE) and "video_frame_index" not in item
    batch = dataset.collater([dataset[index] for index in range(3)])
    float_batch = reference.collater([reference[index] for index in range(3)])
    seen, output = towers_input_and_output(model, batch["net_input"])
    float_seen, float_output = towers_input_and_output(model, float_batch["net_input"])
    assert torch.equal(seen, float_batch["net_input"]["video"]) and torch.equal(seen, float_seen)
    assert torch.equal(output["video_embeddings"], float_output["video_embeddings"])


def test_a_dataloader_worker_hands_over_the_same_batch(corpus):
    task, _ = task_and_model("synchformer_tiny", "av_sync", "av_sync_offset", {"data": str(corpus), **STAGE2})
    dataset = task.dataset("train")
    expected = dataset.collater([dataset[0], dataset[2]])
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=[[0, 2]], collate_fn=dataset.collater,
                                         num_workers=1, multiprocessing_context="fork")
    (batch,) = list(loader)
    for key in ("video", "audio", "video_frame_index"):
        assert torch.equal(batch["net_input"][key], expected["net_input"][key]), key
    assert batch["net_input"]["video"].stride() == expected["net_input"]["video"].stride()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_normalised_segments_equal_float32_items_cast_as_the_trainer_does(dtype):
    frames = torch.arange(256, dtype=torch.uint8).reshape(1, 4, 1, 8, 8).expand(2, 4, 3, 8, 8)
    index = torch.tensor([[0, 1], [1, 2], [2, 3]])
    reference = tr.normalize_rgb(frames.float() / 255.0)[:, index]  # the former float32 items' arithmetic
    ours = tr.normalized_segments(frames, index, dtype=dtype)
    assert ours.shape == (2, 3, 2, 3, 8, 8) and ours.dtype == dtype and ours.is_contiguous()
    assert torch.equal(ours, reference.to(dtype))
    # already normalised floats pass through untouched
    assert tr.normalized_segments(reference) is reference


def test_bad_video_inputs_are_refused():
    with pytest.raises(ValueError, match="video must be uint8 frames .* got torch.int64"):
        tr.normalized_segments(torch.zeros(1, 2, 4, 3, 8, 8, dtype=torch.int64))
    frames = np.zeros((8, 40, 40, 3), np.uint8)
    with pytest.raises(ValueError, match="colour augmentation works on float frames"):
        tr.synchformer_video_transform(frames, 32, True, np.random.default_rng(0), color_augment=True,
                                       normalize=False)
