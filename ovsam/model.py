"""The OVSAM model: stages wired together, built from a config, loaded from the release's files.

Compute splits where its cost does: `embed_image` runs once per image (CLIP tower, SAM2CLIP adapter, FPN:
almost all FLOPs), `encode_prompts` + `decode` run per prompt batch against those features.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from segment_anything.modeling.prompt_encoder import PromptEncoder
from torch import nn

from . import weights as weight_io
from .clip2sam import FPN, HeadOutput, OVSAMHead, classify, clip_region_valid
from .clip_tower import CLIPTower, resize_logits
from .config import MODEL_CONFIG_FILE, WEIGHT_ROLES, OVSAMConfig, load_config
from .fusion import fuse_logits
from .redaction import redact_uri
from .sam2clip import SAM2CLIPAdapter

# Key prefixes of the official files, per weight role: (prefix in the file, attribute of OVSAM).
RELEASE_PREFIXES: dict[str, tuple[tuple[str, str], ...]] = {
    "sam2clip": (("neck_student", "sam2clip"),),
    "clip2sam": (("fpn_neck", "fpn"), ("mask_decoder", "head")),
    "sam": (("prompt_encoder", "prompt_encoder"),),
    "clip": (("", "clip.model"),),
}


@dataclass
class ImageFeatures:
    """Per-image features, computed once and shared by every prompt of the image.

    clip_maps: four [B, C_i, S/s, S/s] CLIP maps (strides 4..32); embedding: [B, dim, S/16, S/16] SAM image
    embedding from SAM2CLIP; fpn_maps: four [B, dim, S/s, S/s] CLIP2SAM FPN maps; region_maps: what CLIP's
    region branch pools from (`CLIPTower.region_maps`), computed by the first `OVSAM.recognise` that needs it.
    """

    clip_maps: list[torch.Tensor]
    embedding: torch.Tensor
    fpn_maps: list[torch.Tensor]
    region_maps: torch.Tensor | None = None


@dataclass
class Decoded:
    """Outputs for N prompts. Boxes are xyxy in the input frame."""

    low_res_masks: torch.Tensor  # [N, 1, S/4, S/4] mask logits
    mask_boxes: torch.Tensor  # [N, 4] boxes of the predicted masks (zeros for an empty mask)
    region_boxes: torch.Tensor  # [N, 4] the regions CLIP embedded
    clip_valid: torch.Tensor  # [N] bool, False where CLIP's view of the mask was empty (CLIP ignored)
    query_logits: torch.Tensor  # [N, K + 1] head logits, last column background
    clip_logits: torch.Tensor  # [N, K + 1] CLIP logits
    fused_logits: torch.Tensor  # [N, K + 1] fused log-probabilities

    def select(self, index: torch.Tensor) -> "Decoded":
        return Decoded(*(getattr(self, name)[index] for name in self.__dataclass_fields__))

    @staticmethod
    def concat(parts: list["Decoded"]) -> "Decoded":
        return Decoded(*(torch.cat([getattr(p, name) for p in parts]) for name in Decoded.__dataclass_fields__))


class OVSAM(nn.Module):
    def __init__(self, config: OVSAMConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.decoder.dim
        grid = config.embedding_grid
        self.clip = CLIPTower(config.clip)
        self.sam2clip = SAM2CLIPAdapter(config.adapter, self.clip.channels, config.image_size, dim)
        self.fpn = FPN(self.clip.channels, dim)
        self.prompt_encoder = PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(grid, grid),
            input_image_size=(config.image_size, config.image_size),
            mask_in_chans=config.decoder.mask_in_chans,
        )
        self.head = OVSAMHead(config.decoder, self.clip.embed_dim)
        # CLIP stays frozen in every use of the model (the release trains around it).
        self.clip.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.head.label_token.weight.device

    def train(self, mode: bool = True) -> "OVSAM":
        super().train(mode)
        self.clip.eval()  # frozen BatchNorm statistics, also while training the other stages
        return self

    def embed_image(self, pixels: torch.Tensor) -> ImageFeatures:
        """pixels: [B, 3, S, S] normalised model input (see `transforms.preprocess`)."""
        clip_maps = self.clip.features(pixels)
        return ImageFeatures(clip_maps, self.sam2clip(clip_maps), self.fpn(clip_maps))

    def encode_prompts(
        self,
        boxes: torch.Tensor | None = None,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse [N, T, dim] and dense [1, dim, g, g] prompt embeddings (no mask prompts: one dense embedding,
        shared by all N prompts).

        boxes: [N, 4] xyxy; points: [N, P, 2] xy with point_labels [N, P] (1 foreground, 0 background);
        both in input-frame pixels.
        """
        point_pair = None
        if points is not None:
            if point_labels is None:
                point_labels = torch.ones(points.shape[:2], dtype=torch.int64, device=points.device)
            point_pair = (points.float(), point_labels)
        with self.float32():
            sparse, dense = self.prompt_encoder(points=point_pair, boxes=None if boxes is None else boxes.float(),
                                                masks=None)
        return sparse, dense[:1]

    def float32(self) -> torch.autocast:
        """No autocast: for the prompt encoder's random Fourier features, whose inputs are coordinates (bf16 has 8
        significant bits: x = 1001.3 would be 1000) and whose outputs are sines of them times 2 pi times the
        random frequencies; a few small matrix products, all in float32."""
        return torch.autocast(self.device.type, enabled=False)

    def decode_masks(self, features: ImageFeatures, sparse: torch.Tensor, dense: torch.Tensor,
                     image_index: torch.Tensor) -> HeadOutput:
        """The head's masks and RoI embeddings for N prompts, without CLIP's region branch.

        image_index: [N] int64 row of `features` each prompt belongs to. The cheap half of `decode`:
        automatic mode runs it on every grid prompt and `recognise` only on the masks it keeps.
        """
        with self.float32():
            image_pe = self.prompt_encoder.get_dense_pe()
        return self.head(features.embedding, image_pe, sparse, dense, image_index, features.fpn_maps,
                         self.config.image_size)

    def recognise(
        self,
        features: ImageFeatures,
        head: HeadOutput,
        image_index: torch.Tensor,
        class_embeddings: torch.Tensor,
        region_boxes: torch.Tensor | None = None,
        seen: torch.Tensor | None = None,
        excluded: torch.Tensor | None = None,
    ) -> Decoded:
        """Class scores of decoded masks: CLIP's region embedding, both classifiers and the fusion.

        class_embeddings: [K, P, E]. region_boxes: [N, 4] input-frame boxes CLIP embeds; None takes the
        boxes of the predicted masks (for box prompts, pass the prompt boxes, as the release does).
        seen / excluded: see `fuse_logits`.
        """
        if region_boxes is None:
            region_boxes = head.mask_boxes
        if features.region_maps is None:
            features.region_maps = self.clip.region_maps(features.clip_maps[-1])
        coarse_masks = resize_logits(head.low_res_masks, features.clip_maps[-1].shape[-1])
        rois = torch.cat([image_index[:, None].to(region_boxes.dtype), region_boxes], dim=1)
        clip_embeddings = self.clip.pool_regions(features.region_maps, rois.float(), coarse_masks)
        class_embeddings = class_embeddings.to(clip_embeddings.device)
        query_logits = classify(head.roi_embeddings, class_embeddings)
        clip_logits = classify(clip_embeddings, class_embeddings)
        valid = clip_region_valid(coarse_masks)
        fused = fuse_logits(query_logits, clip_logits, valid, self.config.fusion, seen, excluded)
        return Decoded(head.low_res_masks, head.mask_boxes, region_boxes, valid, query_logits, clip_logits,
                       fused)

    def decode(
        self,
        features: ImageFeatures,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        image_index: torch.Tensor,
        class_embeddings: torch.Tensor,
        region_boxes: torch.Tensor | None = None,
        seen: torch.Tensor | None = None,
        excluded: torch.Tensor | None = None,
    ) -> Decoded:
        """Masks and class scores for N prompts: `decode_masks` then `recognise` (arguments as there)."""
        head = self.decode_masks(features, sparse, dense, image_index)
        return self.recognise(features, head, image_index, class_embeddings, region_boxes, seen, excluded)

    def text_fingerprint(self) -> str:
        """Hash of the text tower's weights: the cache key of vocabulary embeddings made with it."""
        digest = hashlib.sha256(self.config.clip.arch.encode())
        for name, tensor in sorted(self.clip.text_state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()


def build_model(config: OVSAMConfig, *, base_dir: Path | None = None, cache_dir: Path | None = None) -> OVSAM:
    """Build the model and load each weight role the config names; other roles keep a seeded random init.

    Relative weight paths are taken relative to `base_dir` (a model directory). Loading is strict: a file
    whose keys or shapes do not fit raises `WeightsError` listing them.
    """
    sources = {role: config.weights[role] for role in WEIGHT_ROLES if config.weights.get(role)}
    if base_dir is not None:
        sources = {role: source if "://" in source or Path(source).is_absolute() else str(base_dir / source)
                   for role, source in sources.items()}
    paths = weight_io.resolve_roles(sources, cache_dir=cache_dir)  # every missing file named at once, first
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = OVSAM(config)
    for role, source in sources.items():
        state = weight_io.load_state_dict(paths[role])
        for prefix, attribute in RELEASE_PREFIXES[role]:
            part = weight_io.strip_prefix(state, prefix) if prefix else state
            weight_io.load_strict(model.get_submodule(attribute), part, what=f"{role} ({prefix or 'open_clip'})",
                                  source=redact_uri(source))
    return model.eval()


def load_model(
    spec: str | Path = "tiny",
    *,
    weights: Mapping[str, str] | None = None,
    device: str | torch.device | None = None,
    cache_dir: Path | None = None,
) -> OVSAM:
    """Load a model by preset name, preset JSON file or model directory, in eval mode on `device`.

    weights: role -> source overrides (local path, s3://..., https://..., hf://owner/repo/file), e.g. to
    point at local copies of the released files. device: default CUDA when available, else CPU.
    """
    config, base_dir = load_config(spec)
    if weights:
        config = config.with_weights(weights)
    model = build_model(config, base_dir=base_dir, cache_dir=cache_dir)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device)


def release_state_dicts(model: OVSAM) -> dict[str, dict[str, torch.Tensor]]:
    """The model's weights per role, in the official key layout (e.g. `neck_student.*` for sam2clip)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for role, parts in RELEASE_PREFIXES.items():
        state: dict[str, torch.Tensor] = {}
        for prefix, attribute in parts:
            for key, value in model.get_submodule(attribute).state_dict().items():
                state[f"{prefix}.{key}" if prefix else key] = value.detach().cpu()
        out[role] = state
    return out


def save_model(model: OVSAM, directory: str | Path, *, dtype: torch.dtype | None = None,
               vocabulary: str | None = None) -> Path:
    """Write a model directory: `ovsam_config.json` plus one safetensors file per weight role.

    dtype: store floating-point weights in this dtype (e.g. torch.float16 to halve the size); they are
    cast back to the model's dtype on load. vocabulary: the vocabulary spec the weights were trained with.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for role, state in release_state_dicts(model).items():
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        files[role] = f"{role}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(directory / files[role]))
    config = model.config.to_dict()
    config["weights"] = files
    if vocabulary is not None:
        config["vocabulary"] = vocabulary
    (directory / MODEL_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return directory

