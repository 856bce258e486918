"""CLIP2SAM: the FPN over CLIP's maps and the OVSAM head (SAM's mask decoder plus RoI recognition).

State-dict keys follow the official release: the FPN is mmdet's (`lateral_convs.i.conv`,
`fpn_convs.i.conv`, saved under `fpn_neck.`), the head is `OVSAMHead` (saved under `mask_decoder.`):
`mask_decoder.*` (SAM's decoder with one mask token and no IoU head), `label_token`, `label_mlp`, `roi_conv`.

The head runs once per prompt against an image embedding computed once per image: prompts from several
images can share a call through `image_index`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from segment_anything.modeling.mask_decoder import MLP, MaskDecoder
from torch import nn
from torchvision.ops import roi_align

from .clip_tower import CLIP_STRIDES
from .config import DecoderConfig
from .transformer import FoldedTwoWayTransformer

# Mask logits are thresholded at 0 (sigmoid > 0.5) for the boxes RoIs are taken from and for final masks.
MASK_LOGIT_THRESHOLD = 0.0
# The release's log logit scale; exp is taken in float32 (100.00298...), a constant of the checkpoint.
LOGIT_SCALE_LOG = 4.6052
# Prompts upscaled together on a CPU: 4 of a 64 x 64 grid make ~50 MB of intermediates, which a CPU's caches
# and allocator reuse; a whole batch of 64 makes 800 MB of fresh memory per step and runs at half the speed.
# On an accelerator the whole batch goes at once.
CPU_UPSCALE_PROMPTS = 4
# mmdet's SingleRoIExtractor adds this before the floor so exact powers of two land on the higher level.
LEVEL_MAPPING_EPS = 1e-6


class _Conv(nn.Module):
    """A conv under the attribute name `conv`, matching mmcv ConvModule's keys (`*.conv.weight`)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class FPN(nn.Module):
    """mmdet FPN with its defaults: 1x1 laterals, nearest top-down sums, 3x3 outputs; no norm, no act."""

    def __init__(self, in_channels: tuple[int, ...], out_channels: int) -> None:
        super().__init__()
        self.lateral_convs = nn.ModuleList(_Conv(nn.Conv2d(c, out_channels, 1)) for c in in_channels)
        self.fpn_convs = nn.ModuleList(
            _Conv(nn.Conv2d(out_channels, out_channels, 3, padding=1)) for _ in in_channels
        )

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """Four [B, C_i, H_i, W_i] maps -> four [B, out_channels, H_i, W_i] maps (same strides)."""
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, maps)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[2:], mode="nearest"
            )
        return [conv(x) for conv, x in zip(self.fpn_convs, laterals)]


class MultiLevelRoIAlign(nn.Module):
    """mmdet SingleRoIExtractor: each RoI is aligned on the FPN level that matches its scale."""

    def __init__(self, output_size: int, finest_scale: float, strides: tuple[int, ...] = CLIP_STRIDES) -> None:
        super().__init__()
        self.output_size = output_size
        self.finest_scale = finest_scale
        self.strides = strides

    def levels(self, rois: torch.Tensor) -> torch.Tensor:
        """rois [N, 5] (batch index, x1, y1, x2, y2) -> [N] level index (0 = stride 4)."""
        scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
        level = torch.floor(torch.log2(scale / self.finest_scale + LEVEL_MAPPING_EPS))
        return level.clamp(min=0, max=len(self.strides) - 1).long()

    def forward(self, feats: list[torch.Tensor], rois: torch.Tensor, levels: torch.Tensor | None = None
                ) -> torch.Tensor:
        """feats: four [B, C, H_i, W_i]; rois [N, 5] in input pixels -> [N, C, size, size]."""
        if levels is None:
            levels = self.levels(rois)
        out = feats[0].new_zeros(rois.shape[0], feats[0].shape[1], self.output_size, self.output_size)
        for level, (feat, stride) in enumerate(zip(feats, self.strides)):
            chosen = (levels == level).nonzero(as_tuple=True)[0]
            if chosen.numel():
                # RoI coordinates stay float32 whatever the maps' dtype: bf16 has 8 significant bits, so
                # it would round x = 1001.3 to 1000 (torchvision's autocast rule runs the op in float32).
                out[chosen] = roi_align(feat.float(), rois[chosen].float(), self.output_size,
                                        spatial_scale=1.0 / stride, sampling_ratio=0, aligned=True).to(out.dtype)
        return out


class SingleMaskDecoder(MaskDecoder):
    """segment_anything's MaskDecoder with one mask token and without the IoU token and IoU head.

    The release drops them (`with_iou=False`): the label token takes the IoU token's slot in the
    transformer, and no mask-quality score is predicted. Its transformer folds the projections of the
    image side into the few prompt tokens (`ovsam.transformer`; same modules and result).
    """

    def __init__(self, config: DecoderConfig) -> None:
        transformer = FoldedTwoWayTransformer(
            depth=config.depth, embedding_dim=config.dim, mlp_dim=config.mlp_dim, num_heads=config.num_heads
        )
        super().__init__(transformer_dim=config.dim, transformer=transformer, num_multimask_outputs=0)
        del self.iou_token
        del self.iou_prediction_head

    def mask_logits(self, image_tokens: torch.Tensor, grid: tuple[int, int], mask_tokens: torch.Tensor) -> torch.Tensor:
        """SAM's mask prediction: `output_upscaling` of the image tokens, then the mask token's hypernetwork.

        image_tokens: [N, g_h * g_w, C] the transformer's image side, row-major; grid: (g_h, g_w);
        mask_tokens: [N, C]. Returns [N, 1, 4 g_h, 4 g_w] mask logits.

        The same function as the modules in sequence, computed per low-res pixel: a 2x2 transposed conv of
        stride 2 maps each input pixel to its own 2x2 outputs, i.e. a matrix product on the tokens as they come
        out of the transformer (no transpose to channels-first), and LayerNorm2d normalises each pixel over its
        channels, i.e. a LayerNorm over the last axis (one kernel instead of six element-wise passes). Only the
        one-channel logits are put in image order at the end. On a CPU, prompts go a few at a time
        (`CPU_UPSCALE_PROMPTS`); together the two cut this step to about half for automatic mode's batches.
        """
        n = image_tokens.shape[0]
        step = CPU_UPSCALE_PROMPTS if image_tokens.device.type == "cpu" else max(n, 1)
        hyper = self.output_hypernetworks_mlps[0](mask_tokens)
        first, norm, first_act, second, second_act = self.output_upscaling
        # Each transposed conv as a [C_in, (2, 2, C_out)] matrix and its bias per output column, made once per call.
        layers = [(conv.weight.permute(0, 2, 3, 1).reshape(conv.in_channels, -1), conv.bias.repeat(4),
                   conv.out_channels, act, pixel_norm)
                  for conv, act, pixel_norm in ((first, first_act, norm), (second, second_act, None))]
        logits = torch.cat([_pixel_logits(image_tokens[start:start + step], hyper[start:start + step], layers)
                            for start in range(0, max(n, 1), step)])  # no prompts: one empty chunk
        # token (i, j), first conv's sub-pixel (a, b), second's (c, d) -> pixel (4i + 2a + c, 4j + 2b + d)
        gh, gw = grid
        logits = logits.reshape(n, gh, gw, 2, 2, 2, 2).permute(0, 1, 3, 5, 2, 4, 6)
        return logits.reshape(n, 1, 4 * gh, 4 * gw)


def _pixel_logits(image_tokens: torch.Tensor, hyper: torch.Tensor, layers: list) -> torch.Tensor:
    """[n, T_i, C] image tokens, [n, c] hypernetwork outputs -> [n, T_i * 16] logits, sub-pixels innermost.

    layers: (weight, bias, out_channels, activation, LayerNorm2d or None) per transposed conv, as `mask_logits`
    makes them."""
    n, tokens, c = image_tokens.shape
    x = image_tokens.reshape(-1, c)
    for weight, bias, out_channels, act, pixel_norm in layers:
        x = torch.addmm(bias, x, weight).reshape(-1, out_channels)
        if pixel_norm is not None:
            x = F.layer_norm(x, (out_channels,), pixel_norm.weight, pixel_norm.bias, pixel_norm.eps)
        x = act(x)
    return torch.bmm(x.reshape(n, tokens * 16, out_channels), hyper[:, :, None]).flatten(1)


@dataclass
class HeadOutput:
    low_res_masks: torch.Tensor  # [N, 1, 4g, 4g] mask logits on the 256 grid (for a 1024 input)
    mask_boxes: torch.Tensor  # [N, 4] boxes of the predicted masks in the input frame (zeros if empty)
    roi_embeddings: torch.Tensor  # [N, E] RoI features projected to CLIP's embedding space

    def select(self, index: torch.Tensor) -> "HeadOutput":
        return HeadOutput(*(getattr(self, name)[index] for name in self.__dataclass_fields__))

    @staticmethod
    def concat(parts: list["HeadOutput"]) -> "HeadOutput":
        return HeadOutput(*(torch.cat([getattr(p, name) for p in parts]) for name in HeadOutput.__dataclass_fields__))


class OVSAMHead(nn.Module):
    def __init__(self, config: DecoderConfig, clip_embed_dim: int) -> None:
        super().__init__()
        self.mask_decoder = SingleMaskDecoder(config)
        self.label_token = nn.Embedding(1, config.dim)
        # Loaded and kept for checkpoint compatibility, but unused: the released forward multiplies its
        # output by zero, so it never influences a prediction.
        self.label_mlp = MLP(config.dim, config.dim, clip_embed_dim, 3)
        self.roi_conv = nn.Sequential(_Conv(nn.Conv2d(config.dim, clip_embed_dim, 1, bias=False)), nn.ReLU())
        self.roi_extractor = MultiLevelRoIAlign(config.roi_size, config.finest_scale)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompts: torch.Tensor,
        dense_prompts: torch.Tensor,
        image_index: torch.Tensor,
        fpn_feats: list[torch.Tensor],
        input_size: int,
    ) -> HeadOutput:
        """Decode N prompts against B image embeddings.

        image_embeddings: [B, dim, g, g]; image_pe: [1, dim, g, g]; sparse_prompts: [N, T, dim];
        dense_prompts: [N, dim, g, g], or [1, dim, g, g] shared by all prompts; image_index: [N] int64, the
        image of each prompt; fpn_feats: four [B, dim, H_i, W_i]; input_size: side S of the model input.
        """
        decoder = self.mask_decoder
        n = sparse_prompts.shape[0]
        queries = torch.cat([self.label_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat([queries.unsqueeze(0).expand(n, -1, -1), sparse_prompts], dim=1)
        if dense_prompts.shape[0] == 1 and n and bool((image_index == image_index[0]).all()):
            # One image and a shared dense prompt (no mask prompts: SAM's no-mask embedding): the image side
            # enters the transformer once. segment_anything's attention broadcasts a batch of 1 against the N
            # token sets, so the first layer's image-side projections and additions run once instead of N times
            # (automatic mode decodes 1,024 grid prompts per image); the result is the same.
            src = image_embeddings[image_index[:1]] + dense_prompts
        else:
            src = image_embeddings[image_index] + dense_prompts
        hs, image_tokens = decoder.transformer(src, image_pe, tokens)
        # hs[:, 0] is the label token; the released forward uses only its label MLP, times zero (see label_mlp).
        low_res_masks = decoder.mask_logits(image_tokens, src.shape[2:], hs[:, 1, :])

        mask_boxes = masks_to_boxes(low_res_masks[:, 0] > MASK_LOGIT_THRESHOLD) * (input_size / low_res_masks.shape[-1])
        rois = torch.cat([image_index[:, None].to(mask_boxes.dtype), mask_boxes], dim=1)
        roi_feats = self.roi_extractor(fpn_feats, rois)
        # Width then height, as the release reduces; a joint mean differs in the last bits.
        roi_embeddings = self.roi_conv(roi_feats).mean(-1).mean(-1)
        return HeadOutput(low_res_masks, mask_boxes, roi_embeddings)


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """[N, H, W] bool -> [N, 4] float (x_min, y_min, x_max + 1, y_max + 1) in mask pixels; zeros if empty."""
    n, h, w = masks.shape
    if n == 0:
        return masks.new_zeros((0, 4), dtype=torch.float32)
    rows = masks.any(dim=2)
    cols = masks.any(dim=1)
    ys = torch.arange(h, device=masks.device)
    xs = torch.arange(w, device=masks.device)
    y_min = torch.where(rows, ys, h).amin(dim=1)
    y_max = torch.where(rows, ys, -1).amax(dim=1)
    x_min = torch.where(cols, xs, w).amin(dim=1)
    x_max = torch.where(cols, xs, -1).amax(dim=1)
    boxes = torch.stack([x_min, y_min, x_max + 1, y_max + 1], dim=1).float()
    return torch.where(rows.any(dim=1, keepdim=True), boxes, torch.zeros_like(boxes))


def logit_scale() -> torch.Tensor:
    return torch.tensor(LOGIT_SCALE_LOG, dtype=torch.float32).exp()


def classify(embeddings: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
    """Cosine classifier of the release: max over prototypes, scaled, with a background column of 0.

    embeddings: [N, E]; class_embeddings: [K, P, E] unit-norm prototypes.
    Returns [N, K + 1] logits, the last column is background (its embedding is zero, so its logit is 0).
    """
    normalised = F.normalize(embeddings.float(), dim=-1)
    k, p, e = class_embeddings.shape
    with_background = torch.cat([class_embeddings, class_embeddings.new_zeros(1, p, e)], dim=0)
    similarity = torch.einsum("ne,kpe->nkp", normalised, with_background.to(normalised))
    return similarity.amax(dim=-1) * logit_scale().to(normalised.device)


def clip_region_valid(coarse_mask_logits: torch.Tensor) -> torch.Tensor:
    """[N, 1, h, w] mask logits at CLIP's stride-32 resolution -> [N] bool: positive somewhere.

    Where a mask has no positive logit there, the release ignores the CLIP logits of that prompt
    (alpha = beta = 0).
    """
    return (coarse_mask_logits > MASK_LOGIT_THRESHOLD).flatten(1).any(dim=1)

