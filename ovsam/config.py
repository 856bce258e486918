"""Typed model configuration. Presets are data (JSON files in `ovsam/presets/`), validated once here.

A config says what to build (dimensions of every stage) and where its weights come from (one source per
weight role, see `WEIGHT_ROLES`). A model directory written by `save_model` carries its own config, so a
trained model loads without knowing which preset it started from.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import OVSAMError

PRESET_DIR = Path(__file__).parent / "presets"
CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"
MODEL_CONFIG_FILE = "ovsam_config.json"

# Weight roles and the official file each one corresponds to:
#   sam2clip: the SAM2CLIP adapter (`neck_student.*` keys),
#   clip2sam: FPN + OVSAM head (`fpn_neck.*`, `mask_decoder.*` keys),
#   sam:      a segment-anything checkpoint, of which only `prompt_encoder.*` is used,
#   clip:     an open_clip CLIP state dict (image tower for features, text tower for vocabularies).
WEIGHT_ROLES = ("sam2clip", "clip2sam", "sam", "clip")


class ConfigError(OVSAMError):
    """A model configuration is malformed."""


# Bounds of a model config, checked before anything is allocated. They are far above every released or
# planned model (ViT-H blocks: width 1280; SAM's decoder: 256) and far below sizes that would try to
# allocate tens of gigabytes from a typo: a stage may hold at most MAX_STAGE_PARAMETERS weights (8 GB in
# float32, 13x the SAM2CLIP adapter of the release).
MAX_WIDTH = 8192
MAX_DEPTH = 64
MAX_IMAGE_SIZE = 4096
MAX_STAGE_PARAMETERS = 2_000_000_000
# open_clip config values are counts or sizes; the largest legitimate one is the text vocabulary (49408).
MAX_OPEN_CLIP_VALUE = 1 << 16


def _check_int(field_name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{field_name} must be an integer from {low} to {high:,}, got {value!r}")


def _check_number(field_name: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ConfigError(f"{field_name} must be a number from {low} to {high}, got {value!r}")


def _check_open_clip_values(field_name: str, value: Any) -> None:
    """Every number in an open_clip config is a non-negative count or size below `MAX_OPEN_CLIP_VALUE`."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            _check_open_clip_values(f"{field_name}.{key}", item)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_open_clip_values(f"{field_name}[{index}]", item)
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and not 0 <= value <= MAX_OPEN_CLIP_VALUE:
        raise ConfigError(f"{field_name} must be from 0 to {MAX_OPEN_CLIP_VALUE:,}, got {value!r}")


@dataclass(frozen=True)
class ClipTowerConfig:
    """The CLIP tower, built by open_clip.

    `arch` is an open_clip model name ("RN50x16", "convnext_large_d_320", ...). `open_clip_config`, when
    given, replaces the registry's config for that name (embed_dim, vision_cfg, text_cfg) so that other
    dimensions can be described. `quick_gelu` must match the weights (True for OpenAI's releases).
    """

    arch: str
    open_clip_config: Mapping[str, Any] | None = None
    quick_gelu: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.arch, str) or not self.arch:
            raise ConfigError(f"clip.arch must be an open_clip model name, got {self.arch!r}")
        if self.open_clip_config is None:
            import open_clip  # here, not at import: the CLI reads configs without loading the model stack

            if self.arch not in open_clip.list_models():
                raise ConfigError(f"clip.arch {self.arch!r} is not an open_clip model name (e.g. RN50x16, "
                                  "convnext_large_d_320); give clip.open_clip_config to describe another tower")
            return
        if not isinstance(self.open_clip_config, Mapping):
            raise ConfigError("clip.open_clip_config must be an object (embed_dim, vision_cfg, text_cfg)")
        _check_open_clip_values("clip.open_clip_config", self.open_clip_config)
        _check_int("clip.open_clip_config.embed_dim", self.open_clip_config.get("embed_dim"), 1, MAX_WIDTH)
        vision = self.open_clip_config.get("vision_cfg")
        if not isinstance(vision, Mapping) or not ("layers" in vision or "timm_model_name" in vision):
            raise ConfigError("clip.open_clip_config.vision_cfg must describe a ResNet (layers) or a timm "
                              "ConvNeXt (timm_model_name) image tower")


@dataclass(frozen=True)
class AdapterConfig:
    """SAM2CLIP adapter: SAM ViT blocks over the fused CLIP levels (release: ViT-H block shapes)."""

    embed_dim: int = 1280
    depth: int = 5
    num_heads: int = 16
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (4,)
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        _check_int("adapter.embed_dim", self.embed_dim, 1, MAX_WIDTH)
        _check_int("adapter.depth", self.depth, 1, MAX_DEPTH)
        _check_int("adapter.num_heads", self.num_heads, 1, self.embed_dim)
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"adapter.embed_dim ({self.embed_dim}) must be divisible by adapter.num_heads "
                              f"({self.num_heads})")
        _check_int("adapter.window_size", self.window_size, 1, MAX_IMAGE_SIZE // 16)
        _check_number("adapter.mlp_ratio", self.mlp_ratio, 0.25, 16)
        for index in self.global_attn_indexes:
            _check_int("adapter.global_attn_indexes[]", index, 0, self.depth - 1)
        # A ViT block: qkv + projection (4 d^2) and the MLP (2 * mlp_ratio * d^2).
        parameters = self.depth * (4 + 2 * self.mlp_ratio) * self.embed_dim ** 2
        if parameters > MAX_STAGE_PARAMETERS:
            raise ConfigError(f"adapter.embed_dim {self.embed_dim} with adapter.depth {self.depth} makes "
                              f"{parameters:,.0f} weights, more than the limit of {MAX_STAGE_PARAMETERS:,}")


@dataclass(frozen=True)
class DecoderConfig:
    """SAM prompt encoder + OVSAM head (release: SAM ViT-H decoder shapes, RoIAlign 12x12)."""

    dim: int = 256
    depth: int = 2
    num_heads: int = 8
    mlp_dim: int = 2048
    mask_in_chans: int = 16
    roi_size: int = 12
    # mmdet SingleRoIExtractor's default: RoIs of sqrt(area) < 2 * 56 go to the stride-4 level.
    finest_scale: float = 56.0

    def __post_init__(self) -> None:
        _check_int("decoder.dim", self.dim, 1, MAX_WIDTH)
        _check_int("decoder.depth", self.depth, 1, MAX_DEPTH)
        _check_int("decoder.num_heads", self.num_heads, 1, self.dim)
        if self.dim % self.num_heads:
            raise ConfigError(f"decoder.dim ({self.dim}) must be divisible by decoder.num_heads ({self.num_heads})")
        _check_int("decoder.mlp_dim", self.mlp_dim, 1, 8 * MAX_WIDTH)
        _check_int("decoder.mask_in_chans", self.mask_in_chans, 1, MAX_WIDTH)
        _check_int("decoder.roi_size", self.roi_size, 1, 64)
        _check_number("decoder.finest_scale", self.finest_scale, 1, MAX_IMAGE_SIZE)
        # Two-way transformer layer: three attentions (4 d^2 each) and the MLP (2 d mlp_dim).
        parameters = self.depth * (12 * self.dim ** 2 + 2 * self.dim * self.mlp_dim)
        if parameters > MAX_STAGE_PARAMETERS:
            raise ConfigError(f"decoder.dim {self.dim} with decoder.depth {self.depth} and decoder.mlp_dim "
                              f"{self.mlp_dim} makes {parameters:,} weights, more than the limit of "
                              f"{MAX_STAGE_PARAMETERS:,}")


@dataclass(frozen=True)
class FusionConfig:
    """Geometric ensemble of head and CLIP probabilities (FC-CLIP style), exponents from the release."""

    alpha: float = 0.1  # weight of CLIP for classes seen in training
    beta: float = 0.9  # weight of CLIP for unseen classes

    def __post_init__(self) -> None:
        _check_number("fusion.alpha", self.alpha, 0, 1)
        _check_number("fusion.beta", self.beta, 0, 1)


@dataclass(frozen=True)
class OVSAMConfig:
    name: str
    clip: ClipTowerConfig
    adapter: AdapterConfig = AdapterConfig()
    decoder: DecoderConfig = DecoderConfig()
    fusion: FusionConfig = FusionConfig()
    # Side of the square model input; images are resized so the longest side fits, then padded.
    image_size: int = 1024
    # Weight source per role (local path, fsspec URL, hf://owner/repo/file); a missing role keeps the
    # seeded random initialisation.
    weights: Mapping[str, str] = field(default_factory=dict)
    # The default vocabulary of a run with this model (a `Vocabulary.from_spec` string).
    vocabulary: str | None = None
    # The class strings the CLIP2SAM head was trained on (the categories of its training data). A run's
    # class is "seen" (fusion weight alpha) when it shares a normalised synonym with one of them; every
    # other class is novel (beta). None: the training classes are unknown, every class is novel.
    seen_classes: tuple[str, ...] | None = None
    # False for random-weight presets: every output made with them is marked untrained.
    trained: bool = True
    seed: int = 0
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"name must be a non-empty string, got {self.name!r}")
        _check_int("image_size", self.image_size, 32, MAX_IMAGE_SIZE)
        if self.image_size % 32:
            raise ConfigError(f"image_size must be a multiple of 32 (CLIP's coarsest stride), got {self.image_size}")
        if not isinstance(self.weights, Mapping) or not all(isinstance(v, str) for v in self.weights.values()):
            raise ConfigError("weights must map weight roles to source strings (paths or URLs)")
        if unknown := set(self.weights) - set(WEIGHT_ROLES):
            raise ConfigError(f"unknown weight roles {sorted(unknown)}; known: {list(WEIGHT_ROLES)}")
        if self.vocabulary is not None and not isinstance(self.vocabulary, str):
            raise ConfigError(f"vocabulary must be a vocabulary spec string, got {self.vocabulary!r}")
        if self.seen_classes is not None and not all(isinstance(c, str) and c.strip() for c in self.seen_classes):
            raise ConfigError("seen_classes must be a list of non-empty class strings")
        _check_int("seed", self.seed, 0, 2 ** 63 - 1)

    @property
    def embedding_grid(self) -> int:
        """Side of the SAM image-embedding grid (stride 16)."""
        return self.image_size // 16

    def with_weights(self, overrides: Mapping[str, str]) -> "OVSAMConfig":
        """A copy whose weight sources are updated by `overrides` (role -> source)."""
        return dataclasses.replace(self, weights={**self.weights, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "model config") -> "OVSAMConfig":
        try:
            data = dict(data)
            sections = {
                "clip": ClipTowerConfig,
                "adapter": AdapterConfig,
                "decoder": DecoderConfig,
                "fusion": FusionConfig,
            }
            for key, section_cls in sections.items():
                if key in data:
                    data[key] = section_cls(**data[key])
            if data.get("seen_classes") is not None:
                if not isinstance(data["seen_classes"], (list, tuple)):
                    raise ConfigError("seen_classes must be a list of class strings")
                data["seen_classes"] = tuple(data["seen_classes"])
            if "adapter" in data:
                data["adapter"] = dataclasses.replace(
                    data["adapter"], global_attn_indexes=tuple(data["adapter"].global_attn_indexes)
                )
            return cls(**data)
        except TypeError as err:
            raise ConfigError(f"{source}: {err}") from err
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None


def preset_names() -> list[str]:
    """Names accepted by `load_config`: the JSON presets plus shipped model directories."""
    names = {p.stem for p in PRESET_DIR.glob("*.json")}
    names |= {p.parent.name for p in CHECKPOINT_DIR.glob(f"*/{MODEL_CONFIG_FILE}")}
    return sorted(names)


def load_config(spec: str | Path) -> tuple[OVSAMConfig, Path | None]:
    """Resolve a preset name, a preset JSON file or a model directory.

    Returns the config and, for a model directory, the directory (weight sources in its config are
    relative to it).
    """
    path = Path(spec)
    if path.is_dir() or (CHECKPOINT_DIR / str(spec)).is_dir():
        directory = path if path.is_dir() else CHECKPOINT_DIR / str(spec)
        config_file = directory / MODEL_CONFIG_FILE
        if not config_file.is_file():
            raise ConfigError(f"{directory} is not a model directory: it has no {MODEL_CONFIG_FILE}")
        return _read_config(config_file), directory
    if path.suffix == ".json" and path.is_file():
        return _read_config(path), None
    preset_file = PRESET_DIR / f"{spec}.json"
    if preset_file.is_file():
        return _read_config(preset_file), None
    raise ConfigError(
        f"unknown model preset {str(spec)!r}: not a preset name ({', '.join(preset_names())}), "
        "a preset .json file or a model directory"
    )


def _read_config(path: Path) -> OVSAMConfig:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read model config {path}: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"model config {path} must hold a JSON object, not a {type(data).__name__}")
    return OVSAMConfig.from_dict(data, source=f"model config {path}")


@dataclass(frozen=True)
class AutomaticConfig:
    """Settings of automatic mode (the `label` options of the same names).

    points_per_side: grid of points_per_side^2 prompts. stability: minimum stability score on the low-res
    logits. min_area: minimum mask area in pixels of the stored (original-resolution) mask; an empty mask
    is never kept. nms_iou: a mask overlapping a better one by more mask IoU than this is a duplicate; a
    mask lying inside a better one for more than this share of its own area is a fragment of it.
    max_background: drop masks the head calls background with a probability above this. min_score: minimum
    probability of the label. max_objects: keep at most this many per image, the best first.
    """

    points_per_side: int = 32  # SAM's default grid, 32 x 32 = 1024 prompts per image
    points_per_batch: int = 64  # prompts decoded together
    stability: float = 0.85  # chosen on the shapes recipe's validation seed (README, automatic mode)
    min_area: int = 16
    nms_iou: float = 0.5
    max_background: float = 0.5
    min_score: float = 0.0
    max_objects: int = 100

    def __post_init__(self) -> None:
        checks = [
            ("points_per_side", self.points_per_side >= 1, "at least 1"),
            ("points_per_batch", self.points_per_batch >= 1, "at least 1"),
            ("stability", 0.0 <= self.stability <= 1.0, "in [0, 1]"),
            ("min_area", self.min_area >= 1, "at least 1 pixel (an empty mask is never an object)"),
            ("nms_iou", 0.0 < self.nms_iou <= 1.0, "in (0, 1]"),
            ("max_background", 0.0 <= self.max_background <= 1.0, "in [0, 1]"),
            ("min_score", 0.0 <= self.min_score <= 1.0, "in [0, 1]"),
            ("max_objects", self.max_objects >= 1, "at least 1"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"automatic mode: {name} must be {rule}, got {getattr(self, name)!r}")
