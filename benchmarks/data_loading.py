"""Data loading per worker: clips per second of the training datasets (``__getitem__`` +
``collater``) against raw PyAV decoding of the same windows of the same files, the overhead,
where the time goes, and peak memory of one worker process.

    python benchmarks/data_loading.py --threads 1 --passes 2

Corpora are made with ``avplugins-synth`` in a temporary folder (or reused with --speech /
--sparse): 2.5-3 s speech utterances (96 x 96 grayscale mouths) for ``av_data2vec_pretraining``
and ``av_speech_recognition`` (audio + video), 10 s 256 x 256 RGB clips for ``av_sync`` with
the paper's settings (14 segments of 16 frames, 224 crops, short side 256, 5 s crops).

Raw PyAV = open the files with ``av``, seek to the window, decode every video frame of the
window to uint8 (gray or RGB24, one single-threaded converter per file) and every audio frame
to float32, nothing else: the floor any loader pays. Each dataset runs in a forked process (as a DataLoader worker is), one thread.

``av_sync`` items carry uint8 frames (stage 2: the 120 unique frames of the 14 overlapping
segments, 18 MB at 224, where float32 segments took 135 MB); the models normalise them where the
batch meets them, on their device. That step is no longer in the dataset's time: it is timed
apart ("model side", here on the CPU) after the peak memory of the worker is read.
"""
import argparse
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Tuple

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from _bench_utils_d2v import REPO_ROOT, format_table, machine_description, set_threads

BATCH_SIZE = 2
VIDEO_FPS = 25
SAMPLE_RATE = 16000


# --- corpora and datasets --------------------------------------------------------------------
def make_corpus(kind: str, out_dir: str, num_clips: int, extra: List[str]) -> str:
    """``avplugins-synth KIND`` into ``out_dir`` (every clip in train)."""
    subprocess.run(
        [sys.executable, "-m", "preprocess.synthetic", kind, "--out", out_dir, "--num-clips", str(num_clips),
         "--valid-fraction", "0", "--test-fraction", "0", "--workers", "1", "--seed", "1", *extra],
        check=True, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
    )
    return out_dir


def load_train_dataset(task_name: str, data_dir: str, overrides: Dict[str, object]):
    """The ``train`` dataset of a registered task, as fairseq's trainer loads it."""
    from fairseq import tasks
    from omegaconf import OmegaConf

    import avplugins  # noqa: F401  (registers the plugin)

    cfg = OmegaConf.create({"_name": task_name, "data": data_dir, "seed": 1, "train_subset": "train", **overrides})
    task = tasks.setup_task(cfg)
    task.load_dataset("train")
    return task.dataset("train")


SYNC_PAPER_SETTINGS = {"num_segments": 14, "segment_frames": 16, "segment_stride_frames": 8,
                       "resize_short_side": 256, "crop_size": 224, "crop_s": 5.0}


# --- raw PyAV --------------------------------------------------------------------------------
def raw_decode_video(path: str, start_s: float, end_s: float, gray: bool) -> np.ndarray:
    """Frames with start_s <= time < end_s as uint8 (T, H, W) or (T, H, W, 3), plain PyAV."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # as avplugins.data.media decodes
        if start_s > 0:
            container.seek(int(start_s / stream.time_base), stream=stream, backward=True)
        # one single-threaded converter per file: to_ndarray's default builds a new
        # multi-threaded one per frame, which costs more than the decoding of small frames
        reformatter = VideoReformatter()
        images = []
        for frame in container.decode(stream):
            time_s = float(frame.time)
            if time_s >= end_s - 1e-6:
                break
            if time_s >= start_s - 1e-6:
                images.append(reformatter.reformat(frame, format="gray" if gray else "rgb24", threads=1).to_ndarray())
    return np.stack(images)


def raw_decode_audio(path: str, start_s: float, end_s: float) -> np.ndarray:
    """Mono float32 samples of the frames overlapping [start_s, end_s), plain PyAV (no trim)."""
    with av.open(path) as container:
        stream = container.streams.audio[0]
        if start_s > 0:
            container.seek(int(start_s / stream.time_base), stream=stream, backward=True)
        chunks = []
        for frame in container.decode(stream):
            if float(frame.time) >= end_s:
                break
            samples = frame.to_ndarray()
            if samples.dtype == np.int16:
                samples = samples.astype(np.float32) / 32768.0
            chunks.append(samples.reshape(-1))
    return np.concatenate(chunks)


def speech_windows(dataset) -> List[Tuple[str, str, float, float, bool]]:
    """(video, audio, start_s, end_s, gray) that an AVSpeechDataset item reads (clips shorter
    than max_frames: the whole utterance)."""
    return [(entry.video_path, entry.audio_path, 0.0, int(dataset.sizes[index]) / VIDEO_FPS, True)
            for index, entry in enumerate(dataset.entries)]


def sync_windows(dataset) -> List[Tuple[str, str, float, float, bool, float, float]]:
    """The video and audio windows an av_sync training item decodes (same random draws)."""
    layout = dataset.layout
    windows = []
    for index, entry in enumerate(dataset.entries):
        window = dataset.sample_window(index, dataset.item_rng(index))
        video_start_s = window.video_start_frame / layout.video_fps
        audio_start_s = window.audio_start_sample / layout.sample_rate
        windows.append((entry.video_path, entry.audio_path, video_start_s,
                        video_start_s + layout.span_frames / layout.video_fps, False,
                        audio_start_s, audio_start_s + layout.span_samples / layout.sample_rate))
    return windows


def raw_pass(windows) -> None:
    """Decode every window with plain PyAV."""
    for window in windows:
        video_path, audio_path, video_start_s, video_end_s, gray = window[:5]
        audio_start_s, audio_end_s = window[5:] if len(window) > 5 else (video_start_s, video_end_s)
        raw_decode_video(video_path, video_start_s, video_end_s, gray)
        raw_decode_audio(audio_path, audio_start_s, audio_end_s)


def dataset_pass(dataset) -> None:
    """``__getitem__`` of every clip and ``collater`` per batch of BATCH_SIZE."""
    for first in range(0, len(dataset), BATCH_SIZE):
        dataset.collater([dataset[index] for index in range(first, min(first + BATCH_SIZE, len(dataset)))])


# --- where the time goes ---------------------------------------------------------------------
def wrap_stages(stages: Dict[str, Tuple[object, str]], seconds: Dict[str, float]) -> Callable[[], None]:
    """Replace each ``(module_or_class, attribute)`` by a timed wrapper adding to
    ``seconds[stage]``; returns the function that restores them."""
    originals = []
    for name, (owner, attribute) in stages.items():
        original = getattr(owner, attribute)
        originals.append((owner, attribute, original))

        def timed(*args, _original=original, _name=name, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                seconds[_name] = seconds.get(_name, 0.0) + time.perf_counter() - start

        setattr(owner, attribute, timed)

    def restore() -> None:
        for owner, attribute, original in originals:
            setattr(owner, attribute, original)
    return restore


def speech_stages() -> Dict[str, Tuple[object, str]]:
    from avplugins.data import av_speech_dataset as module
    return {"decode video": (module, "read_video"), "decode audio": (module, "read_audio"),
            "video transform": (module, "av_data2vec_video_transform"),
            "audio features": (module, "av_data2vec_audio_features"),
            "collate": (module.AVSpeechDataset, "collater")}


def sync_stages() -> Dict[str, Tuple[object, str]]:
    from avplugins.data import sync_dataset as module
    return {"decode video": (module, "read_video"), "decode audio": (module, "read_audio"),
            "video transform": (module, "synchformer_video_transform"),
            "audio features": (module, "synchformer_audio_features_at"),
            "collate": (module.AVClipDataset, "collater")}


# --- one worker ------------------------------------------------------------------------------
def current_rss_mib() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def best_pass_seconds(contenders: Dict[str, Callable[[], None]], passes: int) -> Dict[str, float]:
    """Fastest of ``passes`` timed passes of each contender, their passes interleaved (the
    machine's load then weighs on both alike), after one warm-up pass each (warm file cache)."""
    for run in contenders.values():
        run()
    best = {name: float("inf") for name in contenders}
    for _ in range(passes):
        for name, run in contenders.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def model_side_seconds(dataset) -> float:
    """Seconds of one pass spent normalising the collated video as the models do
    (``transforms.normalized_segments``), the work that moved out of the dataset."""
    from avplugins.data.transforms import normalized_segments

    seconds = 0.0
    for first in range(0, len(dataset), BATCH_SIZE):
        items = [dataset[index] for index in range(first, min(first + BATCH_SIZE, len(dataset)))]
        net_input = dataset.collater(items)["net_input"]
        start = time.perf_counter()
        normalized_segments(net_input["video"], net_input.get("video_frame_index"))
        seconds += time.perf_counter() - start
    return seconds


def measure_worker(job: dict, results) -> None:
    """Child process body: times the dataset and raw PyAV; puts a dict in ``results``."""
    set_threads(1)
    start_rss = current_rss_mib()
    dataset = load_train_dataset(job["task"], job["data"], job["overrides"])
    windows = sync_windows(dataset) if job["task"] == "av_sync" else speech_windows(dataset)
    seconds = best_pass_seconds({"raw": lambda: raw_pass(windows), "dataset": lambda: dataset_pass(dataset)},
                                job["passes"])
    stage_seconds: Dict[str, float] = {}
    restore = wrap_stages(sync_stages() if job["task"] == "av_sync" else speech_stages(), stage_seconds)
    try:
        dataset_pass(dataset)
    finally:
        restore()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    results.put({
        "clips": len(dataset), "raw_seconds": seconds["raw"], "dataset_seconds": seconds["dataset"],
        "stages": stage_seconds, "start_rss_mib": start_rss, "peak_rss_mib": peak_rss,
        "model_side_seconds": model_side_seconds(dataset) if job["task"] == "av_sync" else None,
    })


def run_in_worker(job: dict) -> dict:
    """``measure_worker`` in a forked process (as a DataLoader worker)."""
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    process = context.Process(target=measure_worker, args=(job, results))
    process.start()
    result = results.get()
    process.join()
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--passes", type=int, default=3, help="timed passes over the corpus (best kept)")
    parser.add_argument("--speech", help="existing speech corpus (default: generate 6 clips)")
    parser.add_argument("--sparse", help="existing sparse corpus (default: generate 4 clips)")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    import avplugins  # noqa: F401  (imported before forking, as fairseq's workers inherit it)
    import torch  # noqa: F401

    with tempfile.TemporaryDirectory() as root:
        speech = args.speech or make_corpus(
            "speech", os.path.join(root, "speech"), 6,
            ["--min-duration", "2.5", "--max-duration", "3.0", "--vocab-size", "40"])
        sparse = args.sparse or make_corpus("sparse", os.path.join(root, "sparse"), 4, ["--image-size", "256"])
        jobs = [
            ("av_data2vec_pretraining", speech, {"modalities": "audio,video"}),
            ("av_speech_recognition", speech, {"modalities": "audio,video"}),
            ("av_sync", sparse, SYNC_PAPER_SETTINGS),
        ]
        results = [(name, run_in_worker({"task": name, "data": data, "overrides": overrides,
                                         "passes": args.passes}))
                   for name, data, overrides in jobs]
    print(f"machine: {machine_description()}")
    print(f"batches of {BATCH_SIZE}; speech: 2.5-3 s, 96x96 gray -> 88 crops + 104-d fbank; "
          f"av_sync: 10 s 256x256 RGB clips, 14x16 frames at 224, 14 x (128 x 66) log-mels")
    print()
    rows = []
    for name, result in results:
        raw_rate = result["clips"] / result["raw_seconds"]
        dataset_rate = result["clips"] / result["dataset_seconds"]
        rows.append((name, result["clips"], f"{raw_rate:.1f}", f"{dataset_rate:.1f}",
                     f"{100 * (result['dataset_seconds'] / result['raw_seconds'] - 1):.0f} %",
                     f"{result['start_rss_mib']:.0f}", f"{result['peak_rss_mib']:.0f}"))
    print(format_table(["dataset (train)", "clips", "raw PyAV clips/s", "dataset clips/s", "overhead",
                        "worker RSS at start (MiB)", "worker peak RSS (MiB)"], rows))
    print()
    stage_names = list(results[0][1]["stages"])
    stage_rows = []
    for name, result in results:
        per_clip = {stage: 1000 * result["stages"].get(stage, 0.0) / result["clips"] for stage in stage_names}
        stage_rows.append((name, f"{1000 * result['raw_seconds'] / result['clips']:.1f}",
                           *(f"{per_clip[stage]:.1f}" for stage in stage_names)))
    print("milliseconds per clip (the stages of one instrumented pass):")
    print(format_table(["dataset", "raw PyAV", *stage_names], stage_rows))
    for name, result in results:
        if result["model_side_seconds"] is not None:
            print(f"{name}: normalising the collated uint8 video where the batch meets the model (not in the "
                  f"dataset's time; on the model's device, here the CPU): "
                  f"{1000 * result['model_side_seconds'] / result['clips']:.1f} ms per clip")


if __name__ == "__main__":
    main()
