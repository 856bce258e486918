"""SAM2CLIP: the adapter that turns CLIP's four feature maps into a SAM image embedding.

Distilled from SAM ViT-H in the release, it replaces SAM's 600M-parameter encoder: each CLIP level is
patch-embedded to the stride-16 grid, tagged with a learned level embedding, summed, given SAM's absolute
position embedding, and passed through SAM ViT blocks and SAM's neck. State-dict keys follow the official
`MultiLayerTransformerNeck` (`neck_student.*` in the released file): `pos_embed`, `patch_embeds.i.projection`,
`level_encoding`, `blocks.i`, `neck.0..3`.
"""

from __future__ import annotations

from functools import partial

import torch
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.image_encoder import Block
from torch import nn

from .clip_tower import CLIP_STRIDES
from .config import AdapterConfig

EMBEDDING_STRIDE = 16  # SAM's image embedding is on a stride-16 grid (64 x 64 for a 1024 input).
LAYER_NORM_EPS = 1e-6  # SAM ViT's LayerNorm epsilon.


class _PatchEmbed(nn.Module):
    """One CLIP level to the stride-16 grid; the `projection` name matches mmdet's PatchEmbed keys."""

    def __init__(self, in_channels: int, embed_dim: int, stride: int) -> None:
        super().__init__()
        if stride <= EMBEDDING_STRIDE:
            factor = EMBEDDING_STRIDE // stride
            self.projection: nn.Module = nn.Conv2d(in_channels, embed_dim, kernel_size=factor, stride=factor)
        else:
            factor = stride // EMBEDDING_STRIDE
            self.projection = nn.ConvTranspose2d(in_channels, embed_dim, kernel_size=factor, stride=factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(x)


class SAM2CLIPAdapter(nn.Module):
    def __init__(self, config: AdapterConfig, in_channels: tuple[int, ...], image_size: int,
                 out_channels: int) -> None:
        super().__init__()
        grid = image_size // EMBEDDING_STRIDE
        dim = config.embed_dim
        self.patch_embeds = nn.ModuleList(
            _PatchEmbed(c, dim, s) for c, s in zip(in_channels, CLIP_STRIDES)
        )
        self.level_encoding = nn.Embedding(len(in_channels), dim)
        # A persistent buffer in the official module (it is in the released file), learned in SAM.
        self.register_buffer("pos_embed", torch.zeros(1, grid, grid, dim))
        self.blocks = nn.ModuleList(
            Block(
                dim=dim,
                num_heads=config.num_heads,
                mlp_ratio=config.mlp_ratio,
                qkv_bias=True,
                norm_layer=partial(nn.LayerNorm, eps=LAYER_NORM_EPS),
                act_layer=nn.GELU,
                use_rel_pos=True,
                window_size=0 if i in config.global_attn_indexes else config.window_size,
                input_size=(grid, grid),
            )
            for i in range(config.depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(dim, out_channels, kernel_size=1, bias=False),
            LayerNorm2d(out_channels),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_channels),
        )

    def forward(self, clip_maps: list[torch.Tensor]) -> torch.Tensor:
        """clip_maps: four [B, C_i, S/s_i, S/s_i] maps (strides 4..32) -> [B, out_channels, S/16, S/16]."""
        x = None
        for level, (embed, feature) in enumerate(zip(self.patch_embeds, clip_maps)):
            tokens = embed(feature).permute(0, 2, 3, 1) + self.level_encoding.weight[level]
            x = tokens if x is None else x + tokens
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))
