"""The frozen CLIP tower (open_clip): four image feature maps, region embeddings, text embeddings.

OVSAM replaces SAM's ViT-H encoder by a CLIP tower whose multi-scale maps feed both the SAM2CLIP adapter
(for masks) and the CLIP2SAM FPN (for recognition). The same tower also embeds regions the way CLIP embeds
whole images, which is what makes unseen classes recognisable.

Supported families:
* ModifiedResNet (RN50, ..., RN50x16 as released): maps after layer1..4; a region is RoI-aligned on the
  stride-32 map to the attention pool's grid, then attention-pooled (the pool's key and value projections
  are applied once per image, to the whole map, see `CLIPTower.region_maps`).
* ConvNeXt through timm: maps after stages 0..3; a region is mask-pooled on the stride-32 map, then passed
  through the trunk's head and the projection.
"""

from __future__ import annotations

from typing import Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import AttentionPool2d, ModifiedResNet
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

    def region_maps(self, coarsest_map: torch.Tensor) -> torch.Tensor:
        """What regions are pooled from, computed once per image from the stride-32 map [B, C, h, w].

        ResNet: [B, 3, C, h, w], the map, its keys and its values: the attention pool's key and value
        projections (weights only; biases are added per token in `attention_pool_projected`). RoIAlign is
        linear and acts on each channel alike, so aligning the projected map equals projecting the aligned
        region: the projections cost once per image (h * w positions) instead of once per region
        (grid² + 1 tokens each). ConvNeXt: the map itself, [B, C, h, w].
        """
        if not self.is_resnet:
            return coarsest_map
        pool = self.model.visual.attnpool
        weight = torch.cat([pool.k_proj.weight, pool.v_proj.weight])[:, :, None, None]
        projected = F.conv2d(coarsest_map, weight)
        return torch.cat([coarsest_map.to(projected.dtype), projected], dim=1).unflatten(1, (3, -1))

    def pool_regions(self, region_maps: torch.Tensor, boxes: torch.Tensor, mask_logits: torch.Tensor | None
                     ) -> torch.Tensor:
        """CLIP image-level embeddings of regions, [N, E] (not normalised).

        region_maps: from `region_maps`.
        boxes: [N, 5] rows (batch index, x1, y1, x2, y2) in the model input frame (pixels of the S x S input);
            used by ResNet towers.
        mask_logits: [N, 1, S/32, S/32] mask logits at the map's resolution; used by ConvNeXt towers
            (pooling over pixels with logit > 0).
        """
        visual = self.model.visual
        if self.is_resnet:
            stride = CLIP_STRIDES[-1]
            parts = region_maps.shape[1]
            # Each region aligned on the map, its keys and its values (rows 3b, 3b + 1, 3b + 2 of the
            # flattened maps), part after part: every part of the result is contiguous.
            rois = torch.cat([torch.cat([boxes[:, :1] * parts + part, boxes[:, 1:]], dim=1) for part in range(parts)])
            # In float32 (maps and boxes): box coordinates in bf16 would be off by up to 4 input pixels.
            crops = roi_align(region_maps.flatten(0, 1).float(), rois.float(), output_size=self.region_grid,
                              spatial_scale=1.0 / stride, sampling_ratio=0, aligned=True)
            return attention_pool_projected(visual.attnpool, *crops.flatten(2).unflatten(0, (parts, -1)))
        image_index = boxes[:, 0].long()
        weights = (mask_logits > 0).to(region_maps.dtype)
        pooled = (region_maps[image_index] * weights).sum((2, 3)) / weights.sum((2, 3)).clamp(min=1.0)
        head_input = pooled[:, :, None, None]
        return visual.head(visual.trunk.forward_head(head_input).flatten(1))

    def region_embeddings(self, coarsest_map: torch.Tensor, boxes: torch.Tensor,
                          mask_logits: torch.Tensor | None) -> torch.Tensor:
        """`pool_regions` straight from the stride-32 map [B, C, S/32, S/32] (arguments as there), for a
        caller that embeds the regions of a map once."""
        return self.pool_regions(self.region_maps(coarsest_map), boxes, mask_logits)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """[T, context_length] int64 token ids -> [T, E] text embeddings (not normalised)."""
        return self.model.encode_text(tokens)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self._tokenizer(list(texts))

    def text_state_dict(self) -> dict[str, torch.Tensor]:
        """The parameters that determine text embeddings (everything but the image tower)."""
        return {k: v for k, v in self.model.state_dict().items() if not k.startswith("visual.")}


def attention_pool_projected(pool: AttentionPool2d, cells: torch.Tensor, keys: torch.Tensor,
                             values: torch.Tensor) -> torch.Tensor:
    """open_clip's `AttentionPool2d.forward` on regions aligned from `CLIPTower.region_maps`.

    cells, keys, values: [N, C, g²] float, each region aligned on the map, its keys and its values, before
    the positional embedding and the biases (g = the pool's grid). The pool's tokens are the mean of the g²
    cells followed by the cells, each plus its positional embedding; the pool outputs the attention of the
    mean token alone, so only that query is computed. The positional embeddings go through the key and value
    projections once ([g²+1, C], biases included): W(x + p) + b = Wx + (Wp + b). The mean token's key and
    value are the means of the cells' (projection is linear), so its score is the mean of the cells' scores
    and its attention weight spreads evenly over the cells' values: no [N, g²+1, C] token tensor is built.
    Returns [N, output_dim].
    """
    n, channels, num_cells = cells.shape
    heads = pool.num_heads
    head_dim = channels // heads
    position = pool.positional_embedding  # [g² + 1, C], the mean token first
    query = F.linear(cells.mean(2) + position[0], pool.q_proj.weight, pool.q_proj.bias)
    query = query.reshape(n, heads, 1, head_dim) * head_dim**-0.5  # [N, heads, 1, C / heads]
    key_position = F.linear(position, pool.k_proj.weight, pool.k_proj.bias)
    value_position = F.linear(position, pool.v_proj.weight, pool.v_proj.bias)

    def per_head(x: torch.Tensor) -> torch.Tensor:  # [..., C, T] -> [..., heads, C / heads, T]
        return x.to(query.dtype).unflatten(-2, (heads, head_dim))

    cell_scores = (query @ per_head(keys))[:, :, 0]  # [N, heads, g²]
    scores = torch.cat([cell_scores.mean(-1, keepdim=True), cell_scores], dim=-1) + torch.einsum(
        "nhd,hdt->nht", query[:, :, 0], per_head(key_position.T))
    weights = torch.softmax(scores.float(), dim=-1).to(query.dtype)  # [N, heads, g² + 1]
    cell_weights = weights[..., 1:] + weights[..., :1] / num_cells
    attended = (per_head(values) @ cell_weights[..., None])[..., 0] + torch.einsum(
        "nht,hdt->nhd", weights, per_head(value_position.T))
    return pool.c_proj(attended.reshape(n, channels))


def resize_logits(mask_logits: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize (align_corners=False, no antialias) of [N, 1, h, w] logits to [N, 1, size, size]."""
    return F.interpolate(mask_logits, size=(size, size), mode="bilinear", align_corners=False)
