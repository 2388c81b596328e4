"""``avsync predict`` and its library (avplugins.sync_inference) on real media files with a tiny
``synchformer_tiny`` model (4 segments, 32-pixel crops, random weights) saved by the same
writer as ``avplugins-convert``."""
import json

import av
import matplotlib.image
import numpy as np
import pytest
import torch
from fairseq import models, tasks
from omegaconf import OmegaConf

from avplugins.cli.avsync import format_report, main, output_paths
from avplugins.convert.cli import fairseq_checkpoint, fairseq_config, save_checkpoint
from avplugins.data.features import synchformer_audio_features
from avplugins.data.media import read_audio, read_video, write_audio, write_video
from avplugins.data.transforms import synchformer_video_transform
from avplugins.data.media import write_shifted_copy
from avplugins.sync_inference import load_sync_model, predict_video

FPS, SAMPLE_RATE = 25, 16000
HEIGHT, WIDTH = 48, 64
NUM_SEGMENTS, CROP = 4, 32  # one window: (4 - 1) * 8 + 16 = 40 frames = 1.6 s
SHORT_SIDE = round(CROP * 256 / 224)  # 37: the default when the task does not say
FAVOURED_OFFSET_S = 0.4
GRID = np.round(np.linspace(-2, 2, 21), 6)


def build_checkpoint(path, offset_head=True, sync_head=True, stage=2):
    """A tiny random model saved with avplugins-convert's writer. Weights are drawn with std
    1/sqrt(fan_in) so that the logits depend clearly on the input (the default 0.02 init gives
    windows that differ by ~1e-4 only); the offset head favours +0.4 s so the estimate is known."""
    if stage == 1:
        cfg = fairseq_config("synchformer_segment_clip_tiny", "av_sync_pretraining", "segment_infonce",
                             {}, {"num_segments": NUM_SEGMENTS, "crop_size": CROP})
    else:
        cfg = fairseq_config("synchformer_tiny", "av_sync", "av_sync_offset",
                             {"offset_head": offset_head, "sync_head": sync_head},
                             {"num_segments": NUM_SEGMENTS, "crop_size": CROP})
    structured = OmegaConf.create(cfg)
    model = models.build_model(structured.model, tasks.setup_task(structured.task))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                fan_in = parameter[0].numel()
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / fan_in ** 0.5)
        if stage == 2 and offset_head:
            model.net.sync.offset_head.bias[int(np.argmin(np.abs(GRID - FAVOURED_OFFSET_S)))] += 20.0
    save_checkpoint(fairseq_checkpoint(cfg, model.state_dict()), str(path))
    return path


def write_clip(path, num_frames, seed, audio=True):
    """Random-texture RGB frames and white-noise audio of exactly num_frames / 25 s."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (num_frames, HEIGHT, WIDTH, 3), dtype=np.uint8)
    samples = (0.3 * rng.standard_normal(num_frames * SAMPLE_RATE // FPS)).clip(-1, 1).astype(np.float32)
    write_video(path, frames, FPS, audio=samples if audio else None, sample_rate=SAMPLE_RATE)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("avsync")
    return {
        "checkpoint": build_checkpoint(folder / "sync.pt"),
        "sync_only": build_checkpoint(folder / "synchability.pt", offset_head=False),
        "stage1": build_checkpoint(folder / "stage1.pt", stage=1),
        "video": write_clip(folder / "clip.mp4", 100, seed=1),  # 4.00 s
        "other": write_clip(folder / "other.mp4", 60, seed=2),  # 2.40 s
    }


def run_cli(capsys, *argv):
    """(exit status, stdout, stderr) of ``avsync ...``."""
    status = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def direct_window_logits(model, frames, samples, window_start_segment):
    """Oracle: the model run on ONE window, cut with explicit indices from whole-file decodes
    (frames (T, H, W, 3) at 25 fps, resized; samples (N,) at 16 kHz)."""
    first_frame, first_sample = 8 * window_start_segment, 5120 * window_start_segment
    video = torch.stack([
        synchformer_video_transform(frames[first_frame + 8 * j: first_frame + 8 * j + 16], crop_size=CROP)
        for j in range(NUM_SEGMENTS)
    ])
    audio = torch.stack([
        samples[first_sample + 5120 * j: first_sample + 5120 * j + 10240] for j in range(NUM_SEGMENTS)
    ])
    with torch.no_grad():
        return model(video=video[None], audio=synchformer_audio_features(audio)[None])


def test_shared_segment_features_equal_running_each_window(files):
    model, settings = load_sync_model(str(files["checkpoint"]))
    assert settings.short_side == SHORT_SIDE and settings.layout.span_s == pytest.approx(1.6)
    tower_segments = []
    towers = model.forward_features
    model.forward_features = lambda video, audio: tower_segments.append(video.shape[0]) or towers(video, audio)

    prediction = predict_video(model, settings, str(files["video"]), batch_size=3)
    # 4.00 s = 100 frames -> segments start every 8 frames: 11 whole segments; 8 windows of 4
    assert prediction.window_starts_s.tolist() == pytest.approx([0.32 * k for k in range(8)])
    assert sum(tower_segments) == 11 and max(tower_segments) == 3  # once per segment, in batches
    frames = read_video(files["video"], fps=FPS, size=(SHORT_SIDE, int(SHORT_SIDE * WIDTH / HEIGHT)))
    samples = torch.from_numpy(read_audio(files["video"], sample_rate=SAMPLE_RATE))
    direct = [direct_window_logits(model, frames, samples, k) for k in range(8)]
    for name in ("offset_logits", "sync_logits"):
        torch.testing.assert_close(prediction.logits[name], torch.cat([d[name] for d in direct]), rtol=0, atol=1e-5)
    # the comparison has teeth: windows differ far beyond the tolerance
    assert (prediction.logits["offset_logits"][1:] - prediction.logits["offset_logits"][:-1]).abs().max() > 1e-2

    tower_segments.clear()
    sparse = predict_video(model, settings, str(files["video"]), window_stride_s=0.64, batch_size=16)
    assert sparse.window_starts_s.tolist() == pytest.approx([0.0, 0.64, 1.28, 1.92])
    assert sum(tower_segments) == 10  # the 11th segment belongs to no window
    torch.testing.assert_close(sparse.logits["offset_logits"], prediction.logits["offset_logits"][::2],
                               rtol=0, atol=1e-5)


def test_json_report_and_plots_for_several_videos(files, tmp_path, capsys):
    plot = tmp_path / "heat.png"
    status, out, err = run_cli(capsys, "predict", files["video"], files["other"], "--checkpoint",
                               files["checkpoint"], "--plot", plot, "--window-stride", "0.32", "--device", "cpu")
    assert status == 0, err
    report = json.loads(out)
    assert report["grid_s"] == pytest.approx(GRID.tolist())
    assert report["model"] == "synchformer_tiny" and report["window_s"] == pytest.approx(1.6)
    assert report["has_offset_head"] and report["has_sync_head"]
    assert "audio is early" in report["offset_convention"]
    first, second = report["videos"]
    assert (first["num_windows"], second["num_windows"]) == (8, 3)  # 11 and 7 segments
    windows = second["windows"]
    assert [w["start_s"] for w in windows] == pytest.approx([0.0, 0.32, 0.64])
    assert [w["end_s"] for w in windows] == pytest.approx([1.6, 1.92, 2.24])
    probabilities = np.array([w["probabilities"] for w in first["windows"]])
    assert probabilities.shape == (8, 21)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert [w["argmax_offset_s"] for w in first["windows"]] == pytest.approx(GRID[probabilities.argmax(1)].tolist())
    mean = probabilities.mean(axis=0)
    assert first["estimate_s"] == pytest.approx(FAVOURED_OFFSET_S)
    assert first["confidence"] == pytest.approx(mean.max(), abs=1e-5)
    top = first["top3"]
    assert top[0]["offset_s"] == first["estimate_s"]
    assert top[0]["probability"] >= top[1]["probability"] >= top[2]["probability"]
    sync = np.array([w["sync_probability"] for w in first["windows"]])
    assert 0 <= first["sync_probability"] <= 1 and first["sync_probability"] == pytest.approx(sync.mean(), abs=1e-5)

    for name, video in (("clip", first), ("other", second)):
        path = tmp_path / f"heat_{name}.png"
        assert video["plot"] == str(path)
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0


def shift_in_samples(original, shifted, probe_start=12000, probe_length=8000):
    """Where a stretch of ``shifted`` lies in ``original``: d such that shifted[t] ~ original[t - d]."""
    window = shifted[probe_start: probe_start + probe_length]
    correlation = np.correlate(original, window, mode="valid")
    return probe_start - int(correlation.argmax())


def test_fix_shifts_the_audio_by_the_estimate(files, tmp_path, capsys):
    fixed = tmp_path / "fixed.mp4"
    report = tmp_path / "report.json"
    status, out, err = run_cli(capsys, "predict", files["video"], "--checkpoint", files["checkpoint"],
                               "--fix", fixed, "--json", report, "--quiet")
    assert status == 0 and out == "", err
    video = json.loads(report.read_text())["videos"][0]
    assert video["fixed"] == {"path": str(fixed), "audio_delay_s": FAVOURED_OFFSET_S}
    original, corrected = read_audio(files["video"]), read_audio(fixed)
    delay = round(FAVOURED_OFFSET_S * SAMPLE_RATE)  # audio early by 0.4 s -> delayed by 0.4 s
    assert shift_in_samples(original, corrected) == delay
    assert len(corrected) == len(original) + delay
    assert np.abs(corrected[: delay - 1024]).max() < 0.02  # the prepended silence (AAC ringing aside)
    # video packets copied, not re-encoded: the very same bytes
    with av.open(str(files["video"])) as source, av.open(str(fixed)) as copy:
        packets = [[bytes(p) for p in container.demux(container.streams.video[0]) if p.size]
                   for container in (source, copy)]
    assert packets[0] == packets[1]


def test_shifted_copy_advances_audio_and_reencodes_foreign_video(files, tmp_path):
    """A negative delay drops the audio's start; a video codec the output container does not
    take (raw video in mp4) is re-encoded."""
    source = tmp_path / "raw.mkv"
    rng = np.random.default_rng(3)
    frames = np.repeat(np.linspace(0, 255, 50, dtype=np.uint8)[:, None, None, None], 3, axis=3)
    frames = np.broadcast_to(frames, (50, HEIGHT, WIDTH, 3))
    samples = (0.3 * rng.standard_normal(50 * 640)).astype(np.float32)
    with av.open(str(source), "w") as container:
        video = container.add_stream("rawvideo", rate=FPS)
        video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        audio = container.add_stream("pcm_s16le", rate=SAMPLE_RATE, layout="mono")
        for index, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts = index
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        pcm = np.round(samples * 32767).astype(np.int16)[None]
        chunk = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        chunk.sample_rate, chunk.pts = SAMPLE_RATE, 0
        container.mux(audio.encode(chunk))
        container.mux(audio.encode(None))

    out = tmp_path / "advanced.mp4"
    write_shifted_copy(source, out, delay_s=-0.6)
    original, advanced = read_audio(source), read_audio(out)
    assert len(advanced) == len(original) - 9600
    assert shift_in_samples(original, advanced, probe_start=4000) == -9600
    decoded = read_video(out)
    assert decoded.shape == (50, HEIGHT, WIDTH, 3)
    np.testing.assert_allclose(decoded.mean(axis=(1, 2, 3)), frames.mean(axis=(1, 2, 3)), atol=3)


def test_shift_makes_the_audio_early_by_the_offset(files, tmp_path, capsys):
    """``avsync shift --offset e`` writes what ``predict`` should call "audio early by e": the
    copy's audio at t is the original's at t + e; a bad input exits 2 naming the file."""
    shifted = tmp_path / "early.mp4"
    status, _, err = run_cli(capsys, "shift", files["video"], shifted, "--offset", "0.4")
    assert status == 0 and "audio early by +0.40 s" in err
    original, early = read_audio(files["video"]), read_audio(shifted)
    assert shift_in_samples(original, early, probe_start=4000) == -round(0.4 * SAMPLE_RATE)
    missing = tmp_path / "missing.mp4"
    status, _, err = run_cli(capsys, "shift", missing, tmp_path / "x.mp4", "--offset", "1")
    assert status == 2 and str(missing) in err and not (tmp_path / "x.mp4").exists()


def test_sync_only_model_reports_synchronizability(files, capsys, tmp_path):
    status, out, err = run_cli(capsys, "predict", files["video"], "--checkpoint", files["sync_only"])
    assert status == 0, err
    report = json.loads(out)
    video = report["videos"][0]
    assert report["grid_s"] == [] and not report["has_offset_head"]
    assert video["estimate_s"] is None and "only a synchronizability head" in video["note"]
    assert 0 <= video["sync_probability"] <= 1 and "probabilities" not in video["windows"][0]
    status, _, err = run_cli(capsys, "predict", files["video"], "--checkpoint", files["sync_only"],
                             "--fix", tmp_path / "x.mp4")
    assert status == 2 and "only a synchronizability head" in err and not (tmp_path / "x.mp4").exists()


def test_bad_inputs_are_named_and_the_rest_still_analysed(files, tmp_path, capsys):
    silent = write_clip(tmp_path / "silent.mp4", 100, seed=4, audio=False)
    sound_only = tmp_path / "sound.wav"
    write_audio(sound_only, np.zeros(SAMPLE_RATE * 3, np.float32))
    short = write_clip(tmp_path / "short.mp4", 30, seed=5)  # 1.2 s < one 1.6 s window
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"this is not a video" * 100)
    videos = [silent, sound_only, short, garbage, tmp_path / "missing.mp4", files["video"]]
    status, out, err = run_cli(capsys, "predict", *videos, "--checkpoint", files["checkpoint"])
    assert status == 2
    results = json.loads(out)["videos"]
    expected = ["silent.mp4: has no audio stream", "sound.wav: has no video stream",
                "short.mp4: too short", "garbage.mp4: ", "missing.mp4: no such file"]
    for result, message in zip(results, expected):
        assert message in result["error"] and message in err
    assert "needs 1.60 s of both (the minimum length)" in results[2]["error"]
    assert results[-1]["estimate_s"] == pytest.approx(FAVOURED_OFFSET_S)

    status, _, err = run_cli(capsys, "predict", files["video"], "--checkpoint", files["checkpoint"],
                             "--window-stride", "0.5")
    assert status == 2 and "must be a positive multiple of the segment stride 0.32 s" in err


@pytest.mark.parametrize("checkpoint, message", [
    ("stage1", "stage1.pt: not a Synchformer stage-2 checkpoint (model 'synchformer_segment_clip_tiny'"),
    ("missing", "missing.pt does not exist"),
])
def test_wrong_checkpoints_are_refused(files, tmp_path, capsys, checkpoint, message):
    path = files.get(checkpoint, tmp_path / "missing.pt")
    status, out, err = run_cli(capsys, "predict", files["video"], "--checkpoint", path)
    assert status == 2 and message in err and out == ""


def test_output_names_and_report_format():
    assert output_paths("heat.png", ["a/clip.mp4"]) == ["heat.png"]
    assert output_paths("out/fixed.mp4", ["a/x.mp4", "b/x.mkv", "c/y.mp4"]) == [
        "out/fixed_x_0.mp4", "out/fixed_x_1.mp4", "out/fixed_y.mp4"
    ]
    assert output_paths(None, ["a.mp4", "b.mp4"]) == [None, None]
    report = {"grid_s": [-0.2, 0.0, 2e-07], "windows": [{"probabilities": [0.5, 0.5]}], "names": ["a", "b"], "x": None}
    text = format_report(report)
    assert json.loads(text) == report
    assert '"grid_s": [-0.2, 0.0, 2e-07]' in text and '"probabilities": [0.5, 0.5]' in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_request_without_cuda_is_refused(files, capsys):
    status, _, err = run_cli(capsys, "predict", files["video"], "--checkpoint", files["checkpoint"], "--device", "cuda")
    assert status == 2 and "no CUDA device is available here; use --device cpu" in err
