"""The frozen CLIP tower (open_clip): four image feature maps, region embeddings, text embeddings.

OVSAM replaces SAM's ViT-H encoder by a CLIP tower whose multi-scale maps feed both the SAM2CLIP adapter
(for masks) and the CLIP2SAM FPN (for recognition). The same tower also embeds regions the way CLIP embeds
whole images, which is what makes unseen classes recognisable.

Supported families:
* ModifiedResNet (RN50, ..., RN50x16 as released): maps after layer1..4; a region is RoI-aligned on the
  stride-32 map to the attention pool's grid, then attention-pooled.
* ConvNeXt through timm: maps after stages 0..3; a region is mask-pooled on the stride-32 map, then passed
  through the trunk's head and the projection.
"""

from __future__ import annotations

from typing import Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from torch import nn
from torchvision.ops import roi_align

from .config import ClipTowerConfig, ConfigError

CLIP_STRIDES = (4, 8, 16, 32)


class CLIPTower(nn.Module):
    """Wraps an open_clip `CLIP` model; its state dict has the open_clip layout under `model.`."""

    def __init__(self, config: ClipTowerConfig) -> None:
        super().__init__()
        model_cfg = dict(config.open_clip_config or open_clip.get_model_config(config.arch) or {})
        if not model_cfg:
            raise ConfigError(f"open_clip knows no model {config.arch!r} and no open_clip_config was given")
        self.model = open_clip.model.CLIP(**model_cfg, quick_gelu=config.quick_gelu)
        self.context_length = model_cfg["text_cfg"]["context_length"]
        visual = self.model.visual
        if isinstance(visual, ModifiedResNet):
            width = model_cfg["vision_cfg"]["width"]
            # Bottleneck expansion 4, channels doubling per stage.
            self.channels = tuple(width * 4 * 2**i for i in range(4))
            # The attention pool's positional embedding is (grid² + 1) x C: one token per cell plus the mean.
            self.region_grid = round((visual.attnpool.positional_embedding.shape[0] - 1) ** 0.5)
        elif hasattr(visual, "trunk") and hasattr(visual.trunk, "stages"):
            self.channels = tuple(info["num_chs"] for info in visual.trunk.feature_info[-4:])
            self.region_grid = 0
        else:
            raise ConfigError(f"CLIP tower {config.arch!r}: only ResNet and ConvNeXt image towers are supported")
        self.embed_dim = model_cfg["embed_dim"]
        # OpenAI's BPE tokenizer ships inside open_clip, so vocabularies embed offline.
        self._tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=self.context_length)

    @property
    def is_resnet(self) -> bool:
        return isinstance(self.model.visual, ModifiedResNet)

    def features(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """Four feature maps at strides 4, 8, 16, 32.

        pixels: [B, 3, S, S] float, normalised with the ImageNet mean/std on the 0..255 scale (the release
        feeds CLIP this, not CLIP's own normalisation). Returns [B, C_i, S/s_i, S/s_i] for s_i in 4..32.
        """
        visual = self.model.visual
        if self.is_resnet:
            x = visual.stem(pixels)
            maps = []
            for layer in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
                x = layer(x)
                maps.append(x)
            return maps
        x = visual.trunk.stem(pixels)
        maps = []
        for stage in visual.trunk.stages:
            x = stage(x)
            maps.append(x)
        return maps[-4:]

    def region_embeddings(
        self, coarsest_map: torch.Tensor, boxes: torch.Tensor, mask_logits: torch.Tensor
    ) -> torch.Tensor:
        """CLIP image-level embeddings of regions, [N, E] (not normalised).

        coarsest_map: [B, C, S/32, S/32], the stride-32 map from `features`.
        boxes: [N, 5] rows (batch index, x1, y1, x2, y2) in the model input frame (pixels of the S x S input);
            used by ResNet towers.
        mask_logits: [N, 1, S/32, S/32] mask logits at the map's resolution; used by ConvNeXt towers
            (pooling over pixels with logit > 0).
        """
        visual = self.model.visual
        if self.is_resnet:
            stride = CLIP_STRIDES[-1]
            # In float32 (maps and boxes): box coordinates in bf16 would be off by up to 4 input pixels.
            crops = roi_align(coarsest_map.float(), boxes.float(), output_size=self.region_grid,
                              spatial_scale=1.0 / stride, sampling_ratio=0, aligned=True)
            return visual.attnpool(crops)
        image_index = boxes[:, 0].long()
        weights = (mask_logits > 0).to(coarsest_map.dtype)
        pooled = (coarsest_map[image_index] * weights).sum((2, 3)) / weights.sum((2, 3)).clamp(min=1.0)
        head_input = pooled[:, :, None, None]
        return visual.head(visual.trunk.forward_head(head_input).flatten(1))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """[T, context_length] int64 token ids -> [T, E] text embeddings (not normalised)."""
        return self.model.encode_text(tokens)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self._tokenizer(list(texts))

    def text_state_dict(self) -> dict[str, torch.Tensor]:
        """The parameters that determine text embeddings (everything but the image tower)."""
        return {k: v for k, v in self.model.state_dict().items() if not k.startswith("visual.")}


def resize_logits(mask_logits: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize (align_corners=False, no antialias) of [N, 1, h, w] logits to [N, 1, size, size]."""
    return F.interpolate(mask_logits, size=(size, size), mode="bilinear", align_corners=False)
