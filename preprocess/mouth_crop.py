"""Mouth regions of interest (96 x 96 grayscale, 25 fps) from per-frame face landmarks.

Landmarks: a ``.npy`` of shape (T, 68, 2), (x, y) pixel coordinates in the iBUG / dlib
68-point layout, one row per decoded video frame, NaN for frames without a face.

Method (in the spirit of AV-HuBERT's LRS3 pipeline, written without dlib / OpenCV):
1. fill frames without landmarks by linear interpolation in time (nearest known frame at
   the ends);
2. smooth every landmark with a centred moving average (window 12 frames);
3. per frame, an affine map: rotate so the eye line (mean of points 36-41 to mean of
   42-47) is horizontal, scale so the inter-ocular distance is ``eye_distance`` pixels,
   and centre the crop on the mouth (mean of points 48-67);
4. sample the grayscale frame through that map (bilinear, ``torch.grid_sample``).
Without any landmarks, ``--fixed-box`` cuts a fixed square (lower centre of the frame, or
``X,Y,SIZE``) and resizes it to 96 x 96.

    python -m preprocess.mouth_crop VIDEO OUT.mp4 [--landmarks L.npy] [--fixed-box [X,Y,SIZE]]
    python -m preprocess.mouth_crop VIDEO_DIR OUT_DIR [--landmarks LANDMARK_DIR] ...

Landmarks default to ``<video path without extension>.npy``; with a directory, ``--landmarks``
is a folder mirroring the videos' relative paths.
"""
import argparse
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from avplugins.data import media

CROP_SIZE = 96
OUTPUT_FPS = 25.0
SMOOTH_WINDOW = 12
# Inter-ocular distance in crop pixels; with 96 px crops this frames the mouth with the nose
# tip and chin, roughly the scale of AV-HuBERT's mean-face alignment.
EYE_DISTANCE = 70.0
NUM_LANDMARKS = 68
EYE_A = slice(36, 42)  # the eye on the image's left (subject's right)
EYE_B = slice(42, 48)
MOUTH = slice(48, 68)
GRAY_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601 luma
FRAMES_PER_CHUNK = 32  # bounds the float copy of the input frames
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".avi", ".mov", ".webm")


def interpolate_missing(landmarks: np.ndarray) -> np.ndarray:
    """(T, 68, 2) landmarks with NaN frames filled by linear interpolation in time
    (frames before the first / after the last detection copy the nearest one).
    A frame with any NaN counts as missing. Raises ``ValueError`` if every frame is missing."""
    landmarks = np.asarray(landmarks, dtype=np.float64)
    known = ~np.isnan(landmarks).any(axis=(1, 2))
    if not known.any():
        raise ValueError("no frame has landmarks; use a fixed box instead")
    frame_index = np.arange(len(landmarks))
    flat = landmarks.reshape(len(landmarks), -1)
    filled = np.stack([np.interp(frame_index, frame_index[known], flat[known, k]) for k in range(flat.shape[1])], 1)
    return filled.reshape(landmarks.shape)


def smooth_landmarks(landmarks: np.ndarray, window: int = SMOOTH_WINDOW) -> np.ndarray:
    """Centred moving average over ``window`` frames of (T, 68, 2) landmarks (for an even
    window one more frame after than before); near the ends only existing frames count."""
    num_frames = len(landmarks)
    before = (window - 1) // 2
    starts = np.clip(np.arange(num_frames) - before, 0, num_frames)
    stops = np.clip(np.arange(num_frames) - before + window, 0, num_frames)
    cumulative = np.concatenate([np.zeros_like(landmarks[:1]), np.cumsum(landmarks, axis=0)])
    return (cumulative[stops] - cumulative[starts]) / (stops - starts)[:, None, None]


def landmark_geometry(landmarks: np.ndarray, eye_distance: float = EYE_DISTANCE) -> Tuple[np.ndarray, ...]:
    """Per-frame crop geometry from (T, 68, 2) landmarks: (centre (T, 2) = mouth centre in
    input pixels, angle (T,) radians of the eye line, input pixels per crop pixel (T,))."""
    eye_vector = landmarks[:, EYE_B].mean(1) - landmarks[:, EYE_A].mean(1)
    angle = np.arctan2(eye_vector[:, 1], eye_vector[:, 0])
    input_per_crop_pixel = np.linalg.norm(eye_vector, axis=1) / eye_distance
    return landmarks[:, MOUTH].mean(1), angle, input_per_crop_pixel


def fixed_box_geometry(num_frames: int, height: int, width: int, box: Optional[Sequence[float]] = None,
                       crop_size: int = CROP_SIZE) -> Tuple[np.ndarray, ...]:
    """Crop geometry of a fixed square ``box = (x, y, size)`` (top-left corner and side in
    pixels; default: side min(H, W) / 2, centred horizontally, centre at 3/4 of the height)."""
    if box is None:
        size = min(height, width) / 2
        box = (width / 2 - size / 2, 0.75 * height - size / 2, size)
    x, y, size = box
    # Pixel j covers [j, j + 1); its centre, the sampling coordinate, is j + 0.5.
    centre = np.tile([x + size / 2 - 0.5, y + size / 2 - 0.5], (num_frames, 1))
    return centre, np.zeros(num_frames), np.full(num_frames, size / crop_size)


def sampling_grid(centre: np.ndarray, angle: np.ndarray, input_per_crop_pixel: np.ndarray,
                  height: int, width: int, crop_size: int = CROP_SIZE) -> torch.Tensor:
    """(T, S, S, 2) ``grid_sample`` grid (normalised x, y, align_corners=True): crop pixel
    q maps to input pixel centre + scale * R(angle) (q - (S-1)/2), i.e. the crop's x axis
    runs along the eye line and its centre sits on ``centre``."""
    offsets = np.arange(crop_size) - (crop_size - 1) / 2
    crop_y, crop_x = np.meshgrid(offsets, offsets, indexing="ij")  # (S, S)
    cos = (np.cos(angle) * input_per_crop_pixel)[:, None, None]
    sin = (np.sin(angle) * input_per_crop_pixel)[:, None, None]
    input_x = centre[:, 0, None, None] + cos * crop_x - sin * crop_y
    input_y = centre[:, 1, None, None] + sin * crop_x + cos * crop_y
    grid = np.stack([2 * input_x / max(width - 1, 1) - 1, 2 * input_y / max(height - 1, 1) - 1], axis=-1)
    return torch.from_numpy(grid.astype(np.float32))


def to_gray(frames: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) uint8 RGB -> (T, H, W) float32 luma; (T, H, W) input passes through."""
    if frames.ndim == 3:
        return frames.astype(np.float32)
    return frames.astype(np.float32) @ GRAY_WEIGHTS


def warp_frames(frames: np.ndarray, geometry: Tuple[np.ndarray, ...], crop_size: int = CROP_SIZE) -> np.ndarray:
    """Sample (T, S, S) uint8 crops from (T, H, W[, 3]) uint8 frames along per-frame
    ``geometry`` (centre, angle, input pixels per crop pixel); outside the frame = border."""
    num_frames, height, width = frames.shape[:3]
    crops = []
    for start in range(0, num_frames, FRAMES_PER_CHUNK):
        chunk = slice(start, start + FRAMES_PER_CHUNK)
        gray = torch.from_numpy(to_gray(frames[chunk]))[:, None]  # (t, 1, H, W)
        grid = sampling_grid(*(g[chunk] for g in geometry), height, width, crop_size)
        warped = F.grid_sample(gray, grid, mode="bilinear", padding_mode="border", align_corners=True)
        crops.append(warped[:, 0].round().clamp(0, 255).to(torch.uint8).numpy())
    return np.concatenate(crops) if crops else np.zeros((0, crop_size, crop_size), np.uint8)


def _check_landmarks(landmarks: np.ndarray, num_frames: int) -> None:
    if landmarks.ndim != 3 or landmarks.shape[1:] != (NUM_LANDMARKS, 2):
        raise ValueError(f"landmarks must have shape (T, {NUM_LANDMARKS}, 2), got {landmarks.shape}")
    if len(landmarks) != num_frames:
        raise ValueError(f"{len(landmarks)} landmark frames for {num_frames} video frames; "
                         "give one landmark row (NaN if no face) per decoded frame")


def crop_mouth_rois(frames: np.ndarray, landmarks: Optional[np.ndarray] = None, *, fixed_box=None,
                    eye_distance: float = EYE_DISTANCE, smooth_window: int = SMOOTH_WINDOW,
                    crop_size: int = CROP_SIZE) -> np.ndarray:
    """Mouth crops (T, S, S) uint8 grayscale from frames (T, H, W, 3) (or (T, H, W)) uint8.

    ``landmarks`` (T, 68, 2) (x, y) pixels, NaN rows for frames without a face: interpolated,
    smoothed over ``smooth_window`` frames, then each crop is levelled on the eye line,
    scaled to ``eye_distance`` crop pixels between the eyes and centred on the mouth.
    Without landmarks (None or all NaN) ``fixed_box`` (x, y, size) is cut, or the default
    lower-centre box when ``fixed_box`` is True; otherwise ``ValueError``.
    """
    num_frames, height, width = frames.shape[:3]
    has_landmarks = landmarks is not None and not np.isnan(landmarks).all()
    if has_landmarks:
        _check_landmarks(landmarks, num_frames)
        smoothed = smooth_landmarks(interpolate_missing(landmarks), smooth_window)
        geometry = landmark_geometry(smoothed, eye_distance)
    elif fixed_box is not None and fixed_box is not False:
        box = None if fixed_box is True else fixed_box
        geometry = fixed_box_geometry(num_frames, height, width, box, crop_size)
    else:
        raise ValueError("no landmarks for any frame; give landmarks or use a fixed box (--fixed-box)")
    return warp_frames(frames, geometry, crop_size)


def resample_indices(num_frames: int, source_fps: float, target_fps: float = OUTPUT_FPS) -> np.ndarray:
    """Indices of the source frames shown at each target frame time (nearest earlier frame),
    covering the same duration: (round(num_frames * target / source),) int."""
    num_target = int(round(num_frames * target_fps / source_fps))
    times = np.arange(num_target) / target_fps
    return np.minimum(np.floor(times * source_fps + 1e-6).astype(int), num_frames - 1)


def parse_box(text: str) -> Tuple[float, float, float]:
    """``"X,Y,SIZE"`` -> (x, y, size) floats; argparse type for ``--fixed-box``."""
    try:
        x, y, size = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--fixed-box wants X,Y,SIZE (pixels), got {text!r}") from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"--fixed-box SIZE must be > 0, got {size:g}")
    return x, y, size


def crop_video_file(video_path: str, out_path: str, landmarks_path: Optional[str], fixed_box=None,
                    eye_distance: float = EYE_DISTANCE, keep_audio: bool = True) -> int:
    """Crop one video into a 96 x 96 grayscale 25 fps mp4 (with its audio at 16 kHz unless
    ``keep_audio`` is False); returns the number of frames written."""
    if landmarks_path is not None and os.path.isfile(landmarks_path):
        landmarks = np.load(landmarks_path)
    elif fixed_box is not None:
        landmarks = None
    else:
        raise ValueError(f"{video_path}: no landmarks file {landmarks_path}; "
                         "write one (T, 68, 2) .npy per video or pass --fixed-box")
    info = media.probe(video_path)
    frames = media.read_video(video_path)
    try:
        crops = crop_mouth_rois(frames, landmarks, fixed_box=fixed_box, eye_distance=eye_distance)
    except ValueError as e:
        raise ValueError(f"{video_path} ({landmarks_path}): {e}") from e
    crops = crops[resample_indices(len(crops), info.video_fps, OUTPUT_FPS)]
    audio = media.read_audio(video_path) if keep_audio and info.has_audio else None
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    media.write_video(out_path, crops, OUTPUT_FPS, audio=audio)
    return len(crops)


def plan_jobs(source: str, out: str, landmarks: Optional[str]) -> List[Tuple[str, str, Optional[str]]]:
    """(video, output mp4, landmarks .npy) per video: one for a file, every video under a
    folder (outputs and landmarks mirror the relative paths)."""
    if os.path.isfile(source):
        default_landmarks = os.path.splitext(source)[0] + ".npy"
        return [(source, out, landmarks or default_landmarks)]
    if not os.path.isdir(source):
        raise ValueError(f"{source} is neither a video file nor a folder")
    jobs = []
    for folder, _, names in sorted(os.walk(source)):
        for name in sorted(names):
            if name.lower().endswith(VIDEO_EXTENSIONS):
                relative_stem = os.path.splitext(os.path.relpath(os.path.join(folder, name), source))[0]
                landmarks_root = landmarks or source
                jobs.append((os.path.join(folder, name), os.path.join(out, relative_stem + ".mp4"),
                             os.path.join(landmarks_root, relative_stem + ".npy")))
    if not jobs:
        raise ValueError(f"no videos ({', '.join(VIDEO_EXTENSIONS)}) under {source}")
    return jobs


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a video file or a folder of videos (searched recursively)")
    parser.add_argument("out", help="output .mp4 (for a file) or output folder (for a folder)")
    parser.add_argument("--landmarks", help="landmarks .npy (for a file) or folder mirroring the videos")
    parser.add_argument("--fixed-box", nargs="?", const=True, type=parse_box, metavar="X,Y,SIZE",
                        help="when a video has no landmarks, cut this box (default: lower centre of the frame)")
    parser.add_argument("--eye-distance", type=float, default=EYE_DISTANCE,
                        help=f"inter-ocular distance in crop pixels (default {EYE_DISTANCE:g})")
    parser.add_argument("--no-audio", action="store_true", help="do not copy the audio into the crops")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    try:
        jobs = plan_jobs(args.source, args.out, args.landmarks)
        for video_path, out_path, landmarks_path in tqdm(jobs, desc="mouth crops", unit="video"):
            crop_video_file(video_path, out_path, landmarks_path, args.fixed_box, args.eye_distance,
                            keep_audio=not args.no_audio)
    except (ValueError, media.MediaError) as e:
        raise SystemExit(f"error: {e}") from e
    print(f"wrote {len(jobs)} mouth-crop video(s) to {args.out}")


if __name__ == "__main__":
    main()
