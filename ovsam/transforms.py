"""Image preprocessing, prompt coordinates and mask post-processing between the original image frame and
the square model input frame.

Original frame: pixels of the image as given (after EXIF orientation), origin top-left, x right, y down.
Input frame: the image resized so its longest side is S (aspect kept), at the top-left of an S x S canvas.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .errors import PromptError

# The release normalises with ImageNet statistics on the 0..255 scale, for CLIP as well (its weights were
# trained on this input), and pads after normalising, so the padding is exactly 0.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class ImageFrame:
    """Geometry of one image: original (h, w), resized (h, w) inside the S x S input."""

    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    input_size: int

    @classmethod
    def for_image(cls, height: int, width: int, input_size: int) -> "ImageFrame":
        factor = input_size / max(height, width)
        # Round half up, as mmcv's rescale does (the release's test pipeline).
        resized = (int(height * factor + 0.5), int(width * factor + 0.5))
        return cls((height, width), resized, input_size)

    @property
    def scale_xy(self) -> np.ndarray:
        """float32 [sx, sy]: input-frame pixels per original pixel along x and y."""
        (h, w), (rh, rw) = self.original_size, self.resized_size
        return np.array([rw / w, rh / h], dtype=np.float32)

    def boxes_to_input(self, boxes: np.ndarray) -> np.ndarray:
        """[N, 4] xyxy original pixels -> float32 input-frame pixels (float32 product, as the release)."""
        return boxes.astype(np.float32) * np.tile(self.scale_xy, 2)

    def points_to_input(self, points: np.ndarray) -> np.ndarray:
        """[..., 2] xy original pixels -> float32 input-frame pixels."""
        return points.astype(np.float32) * self.scale_xy


def check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{type(image).__name__} {getattr(image, 'dtype', '')} {getattr(image, 'shape', '')}"
        raise ValueError(f"expected an RGB image as a uint8 array of shape [H, W, 3], got {got}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"the image is empty ({image.shape[0]}x{image.shape[1]} pixels)")


@dataclass(frozen=True)
class ResizedImage:
    """An RGB image resized for the model, on the host: what travels to the model's device.

    pixels: [rh, rw, 3] uint8, the image resized so its longest side is S (`frame.resized_size`), not padded.
    """

    pixels: np.ndarray
    frame: ImageFrame


def resize_for_model(image: np.ndarray, input_size: int) -> ResizedImage:
    """RGB uint8 [H, W, 3] (original frame) -> the image resized to the input frame, uint8, on the host.

    Resizing uses OpenCV's bilinear filter on uint8, as the release does; other filters move about 10% of
    the values by one grey level. It runs where the image was decoded (a CPU), so that a [rh, rw, 3] uint8
    array (2.4 MB for 1024x768), not the full image, travels to the model.
    """
    check_image(image)
    frame = ImageFrame.for_image(image.shape[0], image.shape[1], input_size)
    rh, rw = frame.resized_size
    return ResizedImage(cv2.resize(image, (rw, rh), interpolation=cv2.INTER_LINEAR), frame)


def model_input(resized: ResizedImage, device: torch.device | str = "cpu") -> torch.Tensor:
    """A resized image -> normalised float32 [3, S, S] model input on ``device``.

    The uint8 pixels go to the device (from pinned memory without blocking the host on CUDA); the
    conversion to float, the normalisation and the padding run there.
    """
    device = torch.device(device)
    pixels = resized.pixels
    if not pixels.flags.writeable or not pixels.flags.c_contiguous:  # e.g. a view of a received buffer
        pixels = np.array(pixels)  # torch wraps only writable arrays
    pixels = torch.from_numpy(pixels)
    if device.type == "cuda":
        pixels = pixels.pin_memory().to(device, non_blocking=True)
    else:
        pixels = pixels.to(device)
    mean, std = _normalisation(device)
    normalised = (pixels.permute(2, 0, 1).float() - mean) / std
    s = resized.frame.input_size
    rh, rw = resized.frame.resized_size
    return F.pad(normalised, (0, s - rw, 0, s - rh))


@functools.lru_cache(maxsize=None)
def _normalisation(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """PIXEL_MEAN and PIXEL_STD as [3, 1, 1] float32 on ``device``, copied there once."""
    return (torch.tensor(PIXEL_MEAN, device=device).view(3, 1, 1),
            torch.tensor(PIXEL_STD, device=device).view(3, 1, 1))


def preprocess(image: np.ndarray, input_size: int) -> tuple[torch.Tensor, ImageFrame]:
    """RGB uint8 [H, W, 3] -> normalised float32 [3, S, S] model input on the CPU and its frame
    (`resize_for_model` then `model_input`)."""
    resized = resize_for_model(image, input_size)
    return model_input(resized), resized.frame


def upscale_masks(low_res_masks: torch.Tensor, frame: ImageFrame) -> torch.Tensor:
    """Mask logits [N, 1, h, w] on the low-res grid -> [N, H, W] logits in the original frame.

    Bilinear (align_corners=False) to S x S, crop the padding, bilinear to the original size: the
    release's post-processing. Threshold at 0 for binary masks.
    """
    s = frame.input_size
    rh, rw = frame.resized_size
    x = F.interpolate(low_res_masks.float(), size=(s, s), mode="bilinear", align_corners=False)
    x = x[..., :rh, :rw]
    x = F.interpolate(x, size=frame.original_size, mode="bilinear", align_corners=False)
    return x[:, 0]


def mask_run_lengths(masks: torch.Tensor) -> list[np.ndarray]:
    """COCO's uncompressed run lengths of [N, H, W] bool masks on any device -> N uint32 arrays.

    Column-major (COCO's order), alternating runs of 0 and 1 starting with a run of 0 (of length 0 when the
    first pixel is set); the runs of a mask sum to H * W. The change points are found on the masks' device,
    as `segment_anything.utils.amg.mask_to_rle_pytorch` does, but all masks travel to the host in one copy
    (that function synchronises twice per mask), and only the change points travel.
    """
    n, h, w = masks.shape
    if n == 0:
        return []
    flat = masks.permute(0, 2, 1).flatten(1)
    rows, cols = (flat[:, 1:] != flat[:, :-1]).nonzero(as_tuple=True)
    per_mask = torch.bincount(rows, minlength=n)
    # One int32 transfer: first pixel of each mask, number of change points, change points (H * W < 2^31,
    # images are at most MAX_IMAGE_PIXELS).
    packed = torch.cat([flat[:, 0].to(torch.int32), per_mask.to(torch.int32), cols.to(torch.int32)]).cpu().numpy()
    first, counts, changes = packed[:n], packed[n:2 * n], packed[2 * n:]
    out = []
    for starts_with_one, mask_changes in zip(first, np.split(changes, np.cumsum(counts)[:-1])):
        edges = np.concatenate([[0], mask_changes.astype(np.int64) + 1, [h * w]])
        runs = np.diff(edges)
        out.append((np.concatenate([[0], runs]) if starts_with_one else runs).astype(np.uint32))
    return out


def validate_boxes(boxes: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Check [N, 4] xyxy boxes against an image of (height, width) pixels and clip them to it.

    A box partly outside is clipped (detector boxes often overshoot by a pixel). A box that is not
    finite, has x2 <= x1 or y2 <= y1, or does not overlap the image raises PromptError.
    """
    boxes = np.asarray(boxes, dtype=np.float32)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise PromptError(f"boxes must have shape [N, 4] (x1, y1, x2, y2), got {list(boxes.shape)}")
    h, w = image_size
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        shown = [float(v) for v in (x1, y1, x2, y2)]
        if not np.isfinite([x1, y1, x2, y2]).all() or x2 <= x1 or y2 <= y1:
            raise PromptError(f"box {i} (x1, y1, x2, y2) = {shown} is empty or not finite")
        if x2 <= 0 or y2 <= 0 or x1 >= w or y1 >= h:
            raise PromptError(f"box {i} (x1, y1, x2, y2) = {shown} lies outside the {w}x{h} image",
                              PromptError.OUTSIDE_IMAGE)
    return np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)


def validate_points(points: np.ndarray, frame: ImageFrame) -> np.ndarray:
    """Check [N, P, 2] xy points lie inside the image."""
    points = np.asarray(points, dtype=np.float32)
    if points.ndim != 3 or points.shape[2] != 2:
        raise PromptError(f"points must have shape [N, P, 2] (x, y), got {list(points.shape)}")
    h, w = frame.original_size
    outside = ~np.isfinite(points).all(-1) | (points[..., 0] < 0) | (points[..., 1] < 0) \
        | (points[..., 0] >= w) | (points[..., 1] >= h)
    if outside.any():
        i, j = np.argwhere(outside)[0]
        raise PromptError(f"point {j} of prompt {i} {points[i, j].tolist()} lies outside the {w}x{h} image",
                          PromptError.OUTSIDE_IMAGE)
    return points
