"""Video transforms of the two systems.

AV-data2vec (AV-HuBERT's mouth-ROI pipeline, numpy): grayscale (T, H, W) uint8 96 x 96 crops ->
88 x 88 crop (random + horizontal flip p 0.5 in training, centre otherwise) -> /255 ->
normalise mean 0.421, std 0.165 -> float32 (T, 88, 88).

Synchformer (the official ``dataset/transforms.py`` and ``configs/*.yaml`` of v-iashin/Synchformer,
torch): RGB uint8 (T, H, W, 3) -> spatial crop -> [0, 1] -> optional colour jitter / grayscale
-> horizontal flip -> normalise mean 0.5, std 0.5 -> float32 (T, 3, crop, crop). The datasets
stop at the cropped and flipped uint8 frames; the models normalise them on their device
(:func:`normalized_segments`), bit-equal.

Randomness only comes from the ``np.random.Generator`` passed in, never from global state, so a
dataset can make every sample reproducible from (seed, epoch, index).

The crop and flip helpers act on the last two axes (H, W) of a numpy array or a torch tensor,
so they serve both layouts: (T, H, W) grayscale and (..., 3, H, W) channels-first RGB.
"""
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

Frames = Union[np.ndarray, torch.Tensor]

# --- AV-data2vec / AV-HuBERT ---------------------------------------------------------------
MOUTH_CROP_SIZE = 88
GRAY_MEAN = 0.421
GRAY_STD = 0.165
FLIP_P = 0.5

# --- Synchformer ---------------------------------------------------------------------------
SYNCHFORMER_CROP_SIZE = 224
RGB_MEAN = 0.5  # Motionformer's normalisation, the same for the three channels
RGB_STD = 0.5
SMALL_CROP_RATIO = 192 / 224  # official smaller crop (192 of 224), upscaled back to the crop size
STAGE1_SMALL_CROP_P = 0.2  # official stage 1 (segment_avclip.yaml); 0 in stage 2 (sync.yaml)
COLOR_JITTER_P = 0.2  # stage 1 only
GRAYSCALE_P = 0.2  # stage 1 only
COLOR_JITTER_STRENGTH = 1.0  # SimCLR's s: brightness, contrast, saturation 0.8 s, hue 0.2 s
GRAYSCALE_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601 luma, as torchvision


# --- crops and flips (any array with (H, W) last) ------------------------------------------
def _check_crop_fits(frames: Frames, size: int) -> None:
    height, width = frames.shape[-2:]
    if height < size or width < size:
        raise ValueError(
            f"frames of {height}x{width} (HxW) are smaller than the {size}x{size} crop: "
            f"resize them to at least {size} pixels on the short side or use a smaller crop size"
        )


def crop(frames: Frames, top: int, left: int, size: int) -> Frames:
    """The ``size x size`` window at (top, left) of the last two axes (a view, no copy)."""
    return frames[..., top : top + size, left : left + size]


def center_crop(frames: Frames, size: int) -> Frames:
    """Centre ``size x size`` crop of the last two axes.

    The offset is ``(H - size) // 2`` as AV-HuBERT's ``CenterCrop``; Synchformer's official crop
    rounds half to even instead, which differs by one pixel only for an odd margin (the paper
    settings, 96 -> 88 and 256 x even -> 224, have even margins).
    """
    _check_crop_fits(frames, size)
    height, width = frames.shape[-2:]
    return crop(frames, (height - size) // 2, (width - size) // 2, size)


def random_crop(frames: Frames, size: int, rng: np.random.Generator) -> Frames:
    """Uniformly placed ``size x size`` crop of the last two axes, the same window for every
    frame (and channel): the top-left corner is uniform over all positions that fit."""
    _check_crop_fits(frames, size)
    height, width = frames.shape[-2:]
    top = int(rng.integers(0, height - size + 1))
    left = int(rng.integers(0, width - size + 1))
    return crop(frames, top, left, size)


def horizontal_flip(frames: Frames) -> Frames:
    """Mirror the last (width) axis."""
    if isinstance(frames, torch.Tensor):
        return torch.flip(frames, dims=(-1,))
    return np.flip(frames, axis=-1)


def _require_rng(rng: Optional[np.random.Generator]) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"training transforms need an explicit np.random.Generator, got {type(rng).__name__}: "
            "pass rng=np.random.default_rng(seed)"
        )
    return rng


# --- AV-data2vec ---------------------------------------------------------------------------
def _gray_lookup_table() -> np.ndarray:
    """(256,) float32: ``(x / 255 - 0.421) / 0.165`` of every uint8 value ``x``, computed in
    float64 and cast, as AV-HuBERT (which casts its float64 result to float32)."""
    return ((np.arange(256) / 255.0 - GRAY_MEAN) / GRAY_STD).astype(np.float32)


_GRAY_LOOKUP = _gray_lookup_table()


def normalize_gray(frames: np.ndarray) -> np.ndarray:
    """uint8 grayscale (any shape, any strides) -> float32 ``(x / 255 - 0.421) / 0.165``.

    A table lookup: the result depends on the uint8 value only, so it is bit-equal to the
    float64 arithmetic of AV-HuBERT at a fraction of its cost."""
    return np.take(_GRAY_LOOKUP, frames)


def av_data2vec_video_transform(
    frames: np.ndarray,
    train: bool,
    rng: Optional[np.random.Generator] = None,
    crop_size: int = MOUTH_CROP_SIZE,
) -> np.ndarray:
    """AV-HuBERT's mouth-ROI transform.

    Args:
        frames: (T, H, W) uint8 grayscale mouth crops (96 x 96 in LRS3 preprocessing).
        train: random crop + horizontal flip with probability 0.5 (the same for all frames);
            otherwise a centre crop.
        rng: random generator, required when ``train``.
        crop_size: output height and width.

    Returns:
        (T, crop_size, crop_size) float32, normalised with mean 0.421, std 0.165.
    """
    frames = np.asarray(frames)
    if frames.ndim != 3 or frames.dtype != np.uint8:
        raise ValueError(
            f"mouth-ROI frames must be uint8 grayscale (T, H, W), got {frames.dtype} {frames.shape}"
        )
    if train:
        rng = _require_rng(rng)
        frames = random_crop(frames, crop_size, rng)
        if rng.random() < FLIP_P:
            frames = horizontal_flip(frames)
    else:
        frames = center_crop(frames, crop_size)
    return normalize_gray(frames)


# --- resizing (torch, channels first) ------------------------------------------------------
def resize(video: torch.Tensor, height: int, width: int, mode: str = "bicubic") -> torch.Tensor:
    """Resize ``(..., C, H, W)`` to (height, width) with ``F.interpolate`` (antialiased, so
    downscaling does not alias; upscaling is unaffected by it).

    Float input stays float; uint8 input is resized in float32, rounded and clipped back to
    uint8, as torchvision does for uint8 tensors.
    """
    leading_shape = video.shape[:-3]
    flat = video.reshape(-1, *video.shape[-3:])
    resized = F.interpolate(
        flat.float() if video.dtype == torch.uint8 else flat,
        size=(height, width),
        mode=mode,
        align_corners=False,
        antialias=True,
    )
    if video.dtype == torch.uint8:
        resized = resized.round().clamp(0, 255).to(torch.uint8)
    return resized.reshape(*leading_shape, *resized.shape[-3:])


def resize_short_side(video: torch.Tensor, size: int, mode: str = "bicubic") -> torch.Tensor:
    """Resize ``(..., C, H, W)`` so that the short side is ``size``, keeping the aspect ratio
    (long side ``int(size * long / short)``, as torchvision's ``Resize(size)``). Synchformer's
    videos are re-encoded to short side 256 before training; this does it on decoded frames."""
    height, width = video.shape[-2:]
    if height <= width:
        return resize(video, size, int(size * width / height), mode)
    return resize(video, int(size * height / width), size, mode)


# --- colour (torch float in [0, 1], (..., 3, H, W)) ----------------------------------------
def rgb_to_grayscale(video: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) -> (..., 1, H, W) luma ``0.2989 R + 0.587 G + 0.114 B``."""
    weights = video.new_tensor(GRAYSCALE_WEIGHTS).view(3, 1, 1)
    return (video * weights).sum(dim=-3, keepdim=True)


def grayscale(video: torch.Tensor) -> torch.Tensor:
    """Luma replicated to the three channels (torchvision's ``RandomGrayscale`` output)."""
    return rgb_to_grayscale(video).expand_as(video)


def _blend(video: torch.Tensor, other: torch.Tensor, factor: float) -> torch.Tensor:
    return (factor * video + (1.0 - factor) * other).clamp(0.0, 1.0)


def adjust_brightness(video: torch.Tensor, factor: float) -> torch.Tensor:
    """Scale intensities by ``factor`` (blend with black), clipped to [0, 1]."""
    return _blend(video, torch.zeros_like(video), factor)


def adjust_contrast(video: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with the mean luma of each frame (mean over (3, H, W), as torchvision)."""
    mean = rgb_to_grayscale(video).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(video, mean, factor)


def adjust_saturation(video: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with the grayscale image (0: gray, 1: unchanged)."""
    return _blend(video, rgb_to_grayscale(video), factor)


def rgb_to_hsv(video: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) RGB in [0, 1] -> HSV with hue, saturation and value in [0, 1]."""
    red, green, blue = video.unbind(dim=-3)
    value, argmax = video.max(dim=-3)
    chroma = value - video.min(dim=-3).values
    # Divide by 1 where the divisor is 0 (gray or black pixels), then overwrite with 0.
    safe_chroma = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    safe_value = torch.where(value > 0, value, torch.ones_like(value))
    saturation = torch.where(value > 0, chroma / safe_value, 0.0)
    hue_sextant = torch.stack(
        [
            ((green - blue) / safe_chroma) % 6.0,
            (blue - red) / safe_chroma + 2.0,
            (red - green) / safe_chroma + 4.0,
        ]
    ).gather(0, argmax.unsqueeze(0)).squeeze(0)
    hue = torch.where(chroma > 0, hue_sextant / 6.0, 0.0)
    return torch.stack([hue, saturation, value], dim=-3)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv`."""
    hue, saturation, value = hsv.unbind(dim=-3)
    sextant_float = torch.floor(hue * 6.0)
    fraction = hue * 6.0 - sextant_float
    sextant = sextant_float.long() % 6
    p = value * (1.0 - saturation)
    q = value * (1.0 - saturation * fraction)
    t = value * (1.0 - saturation * (1.0 - fraction))
    # Per channel (R, G, B): its value in each of the six sextants of the colour wheel.
    per_sextant = ((value, q, p, p, t, value), (t, value, value, q, p, p), (p, p, t, value, value, q))
    index = sextant.unsqueeze(0)
    channels = [torch.stack(choices).gather(0, index).squeeze(0) for choices in per_sextant]
    return torch.stack(channels, dim=-3)


def adjust_hue(video: torch.Tensor, shift: float) -> torch.Tensor:
    """Rotate the hue by ``shift`` turns (in [-0.5, 0.5]) in HSV space."""
    hsv = rgb_to_hsv(video)
    hue = (hsv[..., 0, :, :] + shift) % 1.0
    return hsv_to_rgb(torch.stack([hue, hsv[..., 1, :, :], hsv[..., 2, :, :]], dim=-3))


VideoOp = Callable[[torch.Tensor], torch.Tensor]


def _compose(operations: Sequence[VideoOp]) -> VideoOp:
    def apply(video: torch.Tensor) -> torch.Tensor:
        for operation in operations:
            video = operation(video)
        return video
    return apply


def draw_color_jitter(rng: np.random.Generator, strength: float = COLOR_JITTER_STRENGTH) -> VideoOp:
    """The random draws of :func:`color_jitter`, returned as the function that applies them."""
    low, high = max(0.0, 1.0 - 0.8 * strength), 1.0 + 0.8 * strength
    brightness, contrast, saturation = rng.uniform(low, high, size=3)
    hue = rng.uniform(-0.2 * strength, 0.2 * strength)
    adjustments = (
        lambda v: adjust_brightness(v, brightness),
        lambda v: adjust_contrast(v, contrast),
        lambda v: adjust_saturation(v, saturation),
        lambda v: adjust_hue(v, hue),
    )
    return _compose([adjustments[index] for index in rng.permutation(len(adjustments))])


def color_jitter(
    video: torch.Tensor, rng: np.random.Generator, strength: float = COLOR_JITTER_STRENGTH
) -> torch.Tensor:
    """SimCLR colour jitter as torchvision's ``ColorJitter(0.8 s, 0.8 s, 0.8 s, 0.2 s)``.

    Brightness, contrast and saturation factors are uniform in [max(0, 1 - 0.8 s), 1 + 0.8 s],
    the hue shift uniform in [-0.2 s, 0.2 s]; the four are applied in a random order. One draw
    for the whole ``(T, 3, H, W)`` clip, as torchvision on a video tensor.
    """
    return draw_color_jitter(rng, strength)(video)


def draw_color_distortion(rng: np.random.Generator) -> Optional[VideoOp]:
    """The random draws of :func:`random_color_distortion` as the function applying them, or
    None when neither the jitter nor the grayscale is drawn (then the clip stays as it is)."""
    operations = []
    if rng.random() < COLOR_JITTER_P:
        operations.append(draw_color_jitter(rng))
    if rng.random() < GRAYSCALE_P:
        operations.append(grayscale)
    return _compose(operations) if operations else None


def random_color_distortion(video: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Official ``RandomApplyColorDistortion`` of stage 1: colour jitter with probability 0.2,
    then grayscale with probability 0.2, drawn once per (T, 3, H, W) clip."""
    distortion = draw_color_distortion(rng)
    return video if distortion is None else distortion(video)


# --- Synchformer ---------------------------------------------------------------------------
def numpy_backed_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype)`` in memory that numpy allocates: numpy asks the kernel
    for transparent huge pages for large arrays (torch's CPU allocator only does with
    ``THP_MEM_ALLOC_ENABLE=1``), which halves the cost of first touching fresh frames."""
    return torch.from_numpy(np.empty(tuple(shape), dtype=torch.empty((), dtype=dtype).numpy().dtype))


def rgb_frames_to_tensor(frames: Frames) -> torch.Tensor:
    """(T, H, W, 3) or (S, T, H, W, 3) uint8 numpy or torch frames -> (..., 3, H, W) uint8 torch
    (a view of contiguous input)."""
    video = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
    if video.dtype != torch.uint8 or video.ndim not in (4, 5) or video.shape[-1] != 3:
        raise ValueError(
            f"expected RGB uint8 frames of shape (T, H, W, 3) or (S, T, H, W, 3), "
            f"got {video.dtype} {tuple(video.shape)}"
        )
    return video.movedim(-1, -3)


def normalize_rgb(video: torch.Tensor) -> torch.Tensor:
    """[0, 1] RGB -> ``(x - 0.5) / 0.5`` in [-1, 1] (Motionformer's normalisation)."""
    return (video - RGB_MEAN) / RGB_STD


def uint8_to_normalized_rgb(video: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 ``(x / 255 - 0.5) / 0.5``, written into ``out`` if given.

    Bit-equal to ``normalize_rgb(video.float() / 255)`` in two passes and one allocation instead
    of four of each: ``x / 255`` is rounded as there, and ``2 a - 1`` equals ``(a - 0.5) / 0.5``
    exactly because multiplying by 1 / RGB_STD = 2 is exact in binary floating point. The
    constants are tensors on ``video``'s device: CUDA turns a division by a Python number into a
    multiplication by its rounded reciprocal, which is not bit-equal.
    """
    out = torch.div(video, torch.full((), 255.0, device=video.device), out=out)
    shift = torch.full((), -RGB_MEAN / RGB_STD, device=out.device)
    return torch.add(shift, out, alpha=1.0 / RGB_STD, out=out)


def normalized_segments(
    video: torch.Tensor, frame_index: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """A batch's video as the Synchformer towers take it: normalised (B, S, T, 3, H, W) segments.

    Datasets hand over uint8 frames (4x less memory than floats, and the overlapping segments of
    stage 2 as the clip's unique frames); this normalises them where the batch meets the model,
    on its device, bit-equal to normalising them in the dataset.

    Args:
        video: uint8 frames, (B, F, 3, H, W) with ``frame_index`` or (B, S, T, 3, H, W) without,
            in any memory order; or floats that are already normalised, (B, S, T, 3, H, W).
        frame_index: (S, T) integer: frame t of segment s is ``video[:, frame_index[s, t]]``.
        dtype: floating dtype of the result for uint8 input (the towers' weights' dtype); the
            values are computed in float32 first, as a float32 item cast by the trainer.

    Returns:
        (B, S, T, 3, H, W): uint8 input normalised to ``(x / 255 - 0.5) / 0.5``, contiguous;
        floating input as given (gathered with ``frame_index`` if given).
    """
    if frame_index is not None:
        video = video[:, frame_index.to(video.device)]
    if video.dtype == torch.uint8:
        normalized = torch.empty(video.shape, dtype=torch.float32, device=video.device)
        return uint8_to_normalized_rgb(video, out=normalized).to(dtype)
    if not video.is_floating_point():
        raise ValueError(
            f"video must be uint8 frames (0..255) or normalised floating-point frames, got {video.dtype}: "
            "convert integer frames to uint8"
        )
    return video


def synchformer_train_crop(
    video: torch.Tensor, crop_size: int, rng: np.random.Generator, small_crop_p: float = 0.0
) -> torch.Tensor:
    """Official ``RGBSpatialCropSometimesUpscale``: a random ``crop_size`` crop, or with
    probability ``small_crop_p`` a random crop of ``round(crop_size * 192 / 224)`` upscaled back
    to ``crop_size`` with bilinear interpolation (torchvision ``Resize``'s default, which the
    official code uses). The same window for every frame of ``(..., 3, H, W)``."""
    if rng.random() < small_crop_p:
        small = random_crop(video, round(crop_size * SMALL_CROP_RATIO), rng)
        return resize(small, crop_size, crop_size, mode="bilinear")
    return random_crop(video, crop_size, rng)


def _segment_windows(
    num_frames: int, segment_starts: Optional[Sequence[int]], segment_frames: Optional[int]
) -> Sequence[slice]:
    """Frame slices of the segments to return, or one slice of the whole clip when no
    segments are asked for."""
    if segment_starts is None:
        return [slice(0, num_frames)]
    starts = [int(start) for start in segment_starts]
    if segment_frames is None or segment_frames <= 0 or not starts or min(starts) < 0 \
            or max(starts) + segment_frames > num_frames:
        raise ValueError(
            f"segments of {segment_frames} frames starting at {starts} do not fit in a clip of "
            f"{num_frames} frames: pass a positive segment_frames and starts in [0, T - segment_frames]"
        )
    return [slice(start, start + segment_frames) for start in starts]


def _write_clip(
    clip: torch.Tensor,
    distortion: Optional[VideoOp],
    flip: bool,
    windows: Sequence[slice],
    out: torch.Tensor,
) -> None:
    """Colour-distort (optional), flip (optional) and cut a cropped uint8 (T, 3, h, w) clip,
    writing the frames of each window into ``out`` (len(windows), L, 3, h, w): uint8 frames as
    they are, or float32 normalised.

    Without colour distortion the flip and the cut stay on uint8: uint8 frames are copied in the
    decoder's (h, w, 3) memory order (whole rows of pixels), normalised values are computed once
    (:func:`uint8_to_normalized_rgb`), straight into ``out``. Colour distortion needs [0, 1]
    floats and takes the float path of the official order (colour, flip, normalise).
    """
    if out.dtype == torch.uint8:
        source = clip.movedim(-3, -1)
        if flip:
            source = torch.flip(source, dims=(-2,))
        for window, window_out in zip(windows, out):
            window_out.movedim(-3, -1).copy_(source[window])
        return
    if distortion is None:
        source = clip.contiguous()
        if flip:
            source = horizontal_flip(source)
        for window, window_out in zip(windows, out):
            uint8_to_normalized_rgb(source[window], out=window_out)
        return
    video = distortion(clip.float() / 255.0)
    if flip:
        video = horizontal_flip(video)
    video = normalize_rgb(video)
    for window, window_out in zip(windows, out):
        window_out.copy_(video[window])


def synchformer_video_transform(
    frames: Frames,
    crop_size: int = SYNCHFORMER_CROP_SIZE,
    train: bool = False,
    rng: Optional[np.random.Generator] = None,
    color_augment: bool = False,
    small_crop_p: float = 0.0,
    short_side: Optional[int] = None,
    segment_starts: Optional[Sequence[int]] = None,
    segment_frames: Optional[int] = None,
    normalize: bool = True,
) -> torch.Tensor:
    """Synchformer's video input.

    Args:
        frames: RGB uint8 (T, H, W, 3) for one clip, or (S, T, H, W, 3) for S segments of a clip.
        crop_size: output height and width (224 for the paper; tiny recipes use less).
        train: random crop (see :func:`synchformer_train_crop`) and horizontal flip with
            probability 0.5; otherwise a centre crop and nothing random.
        rng: random generator, required when ``train``.
        color_augment: stage-1 colour distortion (:func:`random_color_distortion`), training only.
        small_crop_p: probability of the smaller crop upscaled back (official: 0.2 in stage 1,
            :data:`STAGE1_SMALL_CROP_P`; 0 in stage 2).
        short_side: if given, first resize so that the short side has this many pixels (the
            official data are re-encoded to 256 beforehand).
        segment_starts, segment_frames: if given, return only the frames
            ``start ... start + segment_frames - 1`` of each start (frames of the clip),
            cut after the clip is augmented: equal to ``transform(frames)[index]`` with
            ``index = starts[:, None] + arange(segment_frames)``, without normalising frames
            that are not returned (nor copying the ones returned twice in float).
        normalize: False returns the cropped and flipped uint8 frames, for the model to normalise
            (:func:`normalized_segments`); colour augmentation needs floats and is refused then.

    Returns:
        float32 (T, 3, crop_size, crop_size), or (S, T, 3, crop_size, crop_size), normalised to
        ``(x / 255 - 0.5) / 0.5``; with segments, (..., S', segment_frames, 3, crop, crop) where
        S' = len(segment_starts) replaces T. With ``normalize=False`` the same shape in uint8,
        laid out in memory as (..., crop, crop, 3) like the decoded frames (``.movedim(-3, -1)``
        is contiguous).

    As in the official pipelines, the crop window is shared by all frames (and segments), while
    the flip and the colour distortion are drawn per (T, 3, H, W) clip: for segments (S, T, ...)
    independently per segment, which is what the official stage 1 does (it segments before
    flipping); stage 2 flips the whole 5 s clip before cutting it, so pass the clip (and
    ``segment_starts``) there. Differences from the official code: colour operations run on
    float [0, 1] instead of uint8 (no intermediate rounding), and the output is float32 where
    stage 2 uses float16.
    """
    if train and color_augment and not normalize:
        raise ValueError(
            "colour augmentation works on float frames and cannot give uint8 ones: pass normalize=True "
            "with color_augment"
        )
    video = rgb_frames_to_tensor(frames)
    if short_side is not None:
        video = resize_short_side(video, short_side)
    if train:
        rng = _require_rng(rng)
        video = synchformer_train_crop(video, crop_size, rng, small_crop_p)
    else:
        video = center_crop(video, crop_size)
    clips = video.reshape(-1, *video.shape[-4:])  # (N, T, 3, h, w) uint8, a view
    if not normalize and len(clips) == 1 and segment_starts is None:
        # one whole clip: its flipped (or plain) copy is the output, one pass over the frames
        frames = clips[0].movedim(-3, -1)
        if train and rng.random() < FLIP_P:
            frames = torch.flip(frames, dims=(-2,))
        else:
            frames = numpy_backed_empty(frames.shape, torch.uint8).copy_(frames)
        return frames.movedim(-1, -3).reshape(video.shape)
    windows = _segment_windows(clips.shape[1], segment_starts, segment_frames)
    window_frames = windows[0].stop - windows[0].start
    out_shape = (len(clips), len(windows), window_frames)
    if normalize:
        out = torch.empty(*out_shape, *clips.shape[-3:])
    else:
        out = torch.empty(*out_shape, *clips.shape[-2:], 3, dtype=torch.uint8).movedim(-1, -3)
    for clip, clip_out in zip(clips, out):
        distortion = draw_color_distortion(rng) if train and color_augment else None
        flip = train and rng.random() < FLIP_P
        _write_clip(clip, distortion, flip, windows, clip_out)
    segments_shape = (len(windows),) if segment_starts is not None else ()
    return out.reshape(*video.shape[:-4], *segments_shape, window_frames, *out.shape[-3:])
