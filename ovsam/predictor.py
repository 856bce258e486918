"""Prompted prediction: set an image once, answer many box or point prompts in batches.

The image embedding (CLIP tower + SAM2CLIP + FPN) is computed once per image; all its prompts go through
the prompt encoder and the head together, in chunks of `prompt_batch_size`. On CUDA the model runs under
bf16 autocast, on CPU in float32; always under inference mode.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from .clip2sam import MASK_LOGIT_THRESHOLD, HeadOutput, masks_to_boxes
from .model import OVSAM, Decoded, ImageFeatures
from .transforms import (ImageFrame, ResizedImage, mask_run_lengths, model_input, resize_for_model,
                         upscale_masks, validate_boxes, validate_points)
from .vocabulary import Vocabulary, embed_vocabulary

# Full-resolution mask logits (float32) computed at a time when masks are upscaled: 2^26 pixels is 256 MB,
# 34 masks of a 1600x1200 image per chunk (one large scan alone), which bounds device memory on any image.
MASK_UPSCALE_PIXELS = 1 << 26


@dataclass
class Prediction:
    """N objects found in one image.

    The masks stay as low-resolution logits on the model's device; full-resolution masks, their boxes and
    their COCO run lengths are computed from them on that device when asked for, in the original image
    frame (pixels, origin top-left). Only what is asked for reaches the host.
    """

    low_res_masks: torch.Tensor  # [N, 1, S/4, S/4] mask logits on the model's device, input frame
    frame: ImageFrame  # geometry between the input frame and the original image
    label_ids: np.ndarray  # [N] int64 index into the vocabulary
    scores: np.ndarray  # [N] float32 fused probability of the label (background included in the softmax)
    topk_ids: np.ndarray  # [N, k] int64, most probable classes first
    topk_probs: np.ndarray  # [N, k] float32
    background_probs: np.ndarray  # [N] float32 probability that the region is no object of the vocabulary
    prompt_type: str  # "box", "point" or "grid"
    prompts: np.ndarray  # [N, 4] xyxy boxes or [N, 2] xy points that produced each object

    def __len__(self) -> int:
        return len(self.label_ids)

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the original image."""
        return self.frame.original_size

    def mask_chunks(self) -> Iterator[torch.Tensor]:
        """The full-resolution masks, [n, H, W] bool on the model's device, a chunk of masks at a time."""
        h, w = self.frame.original_size
        step = max(1, MASK_UPSCALE_PIXELS // (h * w))
        with torch.inference_mode():
            for start in range(0, len(self), step):
                yield upscale_masks(self.low_res_masks[start:start + step], self.frame) > MASK_LOGIT_THRESHOLD

    @cached_property
    def masks(self) -> np.ndarray:
        """[N, H, W] bool masks in the original frame, on the host (computed once, on first use)."""
        h, w = self.frame.original_size
        if len(self) == 0:
            return np.zeros((0, h, w), dtype=bool)
        return np.concatenate([chunk.cpu().numpy() for chunk in self.mask_chunks()])

    @cached_property
    def boxes(self) -> np.ndarray:
        """[N, 4] float32 xyxy boxes of the full-resolution masks, exclusive max edges; zeros for an empty mask."""
        if len(self) == 0:
            return np.zeros((0, 4), dtype=np.float32)
        return torch.cat([masks_to_boxes(chunk) for chunk in self.mask_chunks()]).cpu().numpy()

    def run_lengths(self) -> list[np.ndarray]:
        """COCO uncompressed run lengths of the full-resolution masks (see `transforms.mask_run_lengths`):
        N uint32 arrays. Only the change points of the masks leave the device."""
        return [runs for chunk in self.mask_chunks() for runs in mask_run_lengths(chunk)]


class Predictor:
    """Answers prompts for images with one model and one vocabulary.

    vocabulary: defaults to the model config's vocabulary, else COCO. Its classes that the weights were
    trained on (`config.seen_classes`, matched by synonym) are fused with weight alpha, the others with beta.
    top_k: how many ranked labels each object keeps. prompt_batch_size: prompts decoded together.
    class_embeddings: precomputed [K, P, E] unit-norm embeddings of `vocabulary` (such as the release's
    class-embedding files); default: embedded with the model's CLIP text tower (cached on disk).
    compile_encoder: run the image encoder (CLIP tower, SAM2CLIP, FPN) under ``torch.compile``: the first
    batch waits for the compilation (about 100 s for the released architecture on a CPU), later ones run
    faster (1.2x measured there, `benchmarks/bench_gpu.py --compile`); a new batch size compiles once more,
    after which the batch dimension is dynamic. Where compiling fails (a machine without the C++ compiler or
    Triton that inductor needs), the encoder runs eagerly, with a warning.
    """

    def __init__(self, model: OVSAM, vocabulary: Vocabulary | None = None, *, top_k: int = 5,
                 prompt_batch_size: int = 64, class_embeddings: torch.Tensor | None = None,
                 cache_dir: Path | None = None, compile_encoder: bool = False) -> None:
        # Channels-last: the convolutions of the CLIP tower, SAM2CLIP and the FPN run faster on NHWC tensors (measured
        # on a CPU: one real-size embedding 11.2 s -> 9.6 s; cuDNN's tensor-core kernels are NHWC too). This changes
        # the strides of the model's weights in place, not their values; `save_model` writes them contiguous.
        self.model = model.eval().to(memory_format=torch.channels_last)
        self.vocabulary = vocabulary or Vocabulary.from_spec(model.config.vocabulary or "coco")
        self.top_k = min(top_k, len(self.vocabulary))
        self.prompt_batch_size = prompt_batch_size
        device = model.device
        if class_embeddings is not None:
            if class_embeddings.dim() != 3 or class_embeddings.shape[0] != len(self.vocabulary):
                raise ValueError(f"class_embeddings must be [K={len(self.vocabulary)}, P, E], "
                                 f"got {list(class_embeddings.shape)}")
        else:
            class_embeddings = embed_vocabulary(
                self.vocabulary,
                lambda tokens: model.clip.encode_text(tokens.to(device)),
                model.clip.tokenize,
                text_tower_fingerprint=model.text_fingerprint(),
                cache_dir=cache_dir,
            )
        self.class_embeddings = class_embeddings.to(device)
        # Seen classes come from what the weights were trained on, not from the run's vocabulary.
        self.seen = torch.from_numpy(self.vocabulary.seen_by(model.config.seen_classes)).to(device)
        self._compiled_embed = torch.compile(model.embed_image) if compile_encoder else None
        self._features: ImageFeatures | None = None
        self._frame: ImageFrame | None = None

    # -- autocast / inference context ---------------------------------------------------------------
    def _context(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if self.model.device.type == "cuda":
            stack.enter_context(torch.autocast("cuda", dtype=torch.bfloat16))
        return stack

    def embed_images(self, images: Sequence[np.ndarray | ResizedImage]) -> tuple[ImageFeatures, list[ImageFrame]]:
        """Embed a batch of images in one forward pass: RGB uint8 [H, W, 3] arrays (any sizes, EXIF
        orientation applied), or images already resized by `transforms.resize_for_model` where they were
        decoded. Only uint8 pixels travel to the device; normalisation and padding run there."""
        size = self.model.config.image_size
        resized = [image if isinstance(image, ResizedImage) else resize_for_model(image, size) for image in images]
        pixels = torch.stack([model_input(image, self.model.device) for image in resized])
        pixels = pixels.contiguous(memory_format=torch.channels_last)
        with self._context():
            features = self._embed(pixels)
        return features, [image.frame for image in resized]

    def _embed(self, pixels: torch.Tensor) -> ImageFeatures:
        if self._compiled_embed is not None:
            try:
                return self._compiled_embed(pixels)
            except torch._dynamo.exc.BackendCompilerFailed as err:
                # A compiler missing on one node must not turn a run into error rows: the eager encoder gives
                # the same features.
                warnings.warn(f"torch.compile of the image encoder failed, running it eagerly: "
                              f"{type(err.inner_exception).__name__}: {err.inner_exception}", RuntimeWarning)
                self._compiled_embed = None
        return self.model.embed_image(pixels)

    def set_image(self, image: np.ndarray | ResizedImage) -> None:
        """Compute and keep the embedding of one image (as `embed_images` takes it)."""
        features, frames = self.embed_images([image])
        self._features, self._frame = features, frames[0]

    def predict(self, *, boxes: np.ndarray | None = None, points: np.ndarray | None = None,
                point_labels: np.ndarray | None = None, region_boxes: np.ndarray | None = None) -> Prediction:
        """Objects for box prompts [N, 4] xyxy or point prompts [N, P, 2] xy (labels [N, P], 1 = foreground,
        0 = background; default all 1), in original-image pixels, against the image of `set_image`.

        region_boxes: [N, 4] xyxy original pixels for CLIP to embed; default: the prompt boxes for box
        prompts, the boxes of the predicted masks for point prompts.
        Raises PromptError for a box or point outside the image.
        """
        if self._features is None or self._frame is None:
            raise RuntimeError("call set_image before predict")
        return self._predict(self._features, self._frame, 0, boxes, points, point_labels, region_boxes)

    def predict_images(self, images: Sequence[np.ndarray | ResizedImage],
                       boxes: Sequence[np.ndarray]) -> list[Prediction]:
        """Box-prompted prediction for several images: one batched embedding pass, then each image's boxes.

        A PromptError for one image is raised as is; callers that need per-image errors validate boxes
        first with `transforms.validate_boxes`.
        """
        features, frames = self.embed_images(images)
        return [self._predict(features, frame, i, image_boxes, None, None, None)
                for i, (frame, image_boxes) in enumerate(zip(frames, boxes))]

    def _predict(self, features: ImageFeatures, frame: ImageFrame, image_row: int, boxes, points, point_labels,
                 region_boxes) -> Prediction:
        if (boxes is None) == (points is None):
            raise ValueError("give either boxes or points")
        if boxes is not None:
            prompts = validate_boxes(boxes, frame.original_size)
            prompt_type = "box"
            if region_boxes is None:
                region_boxes = prompts
        else:
            prompts = validate_points(points, frame)
            prompt_type = "point"
        decoded = self.decode(features, frame, image_row, prompts, prompt_type, point_labels, region_boxes)
        prompt_rows = prompts if prompt_type == "box" else prompts[:, 0, :]
        return self.to_prediction(decoded, frame, prompt_type, prompt_rows)

    def decode(self, features: ImageFeatures, frame: ImageFrame, image_row: int, prompts: np.ndarray,
               prompt_type: str, point_labels: np.ndarray | None = None,
               region_boxes: np.ndarray | None = None) -> Decoded:
        """Run validated prompts (original pixels) for image row `image_row` of `features`, in chunks."""
        chunks = []
        for start in range(0, max(len(prompts), 1), self.prompt_batch_size):  # no prompts: one empty chunk
            part = slice(start, start + self.prompt_batch_size)
            labels = None if point_labels is None else point_labels[part]
            head = self.decode_masks(features, frame, image_row, prompts[part], prompt_type, labels)
            regions = None if region_boxes is None else np.asarray(region_boxes)[part]
            chunks.append(self.recognise(features, frame, image_row, head, regions))
        return Decoded.concat(chunks)

    def decode_masks(self, features: ImageFeatures, frame: ImageFrame, image_row: int, prompts: np.ndarray,
                     prompt_type: str, point_labels: np.ndarray | None = None) -> HeadOutput:
        """The head's masks for one chunk of validated prompts (original pixels), without CLIP."""
        device = self.model.device
        with self._context():
            if prompt_type == "box":
                sparse, dense = self.model.encode_prompts(
                    boxes=torch.from_numpy(frame.boxes_to_input(prompts)).to(device))
            else:
                labels = None if point_labels is None else torch.as_tensor(point_labels, device=device)
                sparse, dense = self.model.encode_prompts(
                    points=torch.from_numpy(frame.points_to_input(prompts)).to(device), point_labels=labels)
            index = torch.full((len(prompts),), image_row, dtype=torch.int64, device=device)
            return self.model.decode_masks(features, sparse, dense, index)

    def recognise(self, features: ImageFeatures, frame: ImageFrame, image_row: int, head: HeadOutput,
                  region_boxes: np.ndarray | None = None) -> Decoded:
        """Labels of decoded masks (CLIP region branch + fusion), in chunks of `prompt_batch_size`.

        region_boxes: [N, 4] xyxy original pixels for CLIP to embed; default the boxes of the masks.
        """
        device = self.model.device
        chunks = []
        # At least one (possibly empty) chunk, so that no candidates give an empty Decoded.
        for start in range(0, max(1, len(head.low_res_masks)), self.prompt_batch_size):
            part = slice(start, start + self.prompt_batch_size)
            with self._context():
                regions = None if region_boxes is None else \
                    torch.from_numpy(frame.boxes_to_input(np.asarray(region_boxes)[part])).to(device)
                chunk = head.select(part)
                index = torch.full((len(chunk.low_res_masks),), image_row, dtype=torch.int64, device=device)
                chunks.append(self.model.recognise(features, chunk, index, self.class_embeddings,
                                                   region_boxes=regions, seen=self.seen))
        return Decoded.concat(chunks)

    def to_prediction(self, decoded: Decoded, frame: ImageFrame, prompt_type: str,
                      prompts: np.ndarray) -> Prediction:
        """Rank labels (background never wins); the masks stay low-resolution logits on the device."""
        probs = torch.softmax(decoded.fused_logits.float(), dim=-1)
        class_probs = probs[:, :-1]
        topk_probs, topk_ids = class_probs.topk(self.top_k, dim=-1)
        # Two copies to the host (one per dtype) instead of one per field.
        host_probs = torch.cat([topk_probs, probs[:, -1:]], dim=1).cpu().numpy().astype(np.float32)
        host_ids = topk_ids.cpu().numpy().astype(np.int64)
        return Prediction(
            low_res_masks=decoded.low_res_masks,
            frame=frame,
            label_ids=host_ids[:, 0].copy(),
            scores=host_probs[:, 0].copy(),
            topk_ids=host_ids,
            topk_probs=host_probs[:, :-1].copy(),
            background_probs=host_probs[:, -1].copy(),
            prompt_type=prompt_type,
            prompts=np.asarray(prompts, dtype=np.float32),
        )

