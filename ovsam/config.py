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


@dataclass(frozen=True)
class AdapterConfig:
    """SAM2CLIP adapter: SAM ViT blocks over the fused CLIP levels (release: ViT-H block shapes)."""

    embed_dim: int = 1280
    depth: int = 5
    num_heads: int = 16
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (4,)
    mlp_ratio: float = 4.0


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


@dataclass(frozen=True)
class FusionConfig:
    """Geometric ensemble of head and CLIP probabilities (FC-CLIP style), exponents from the release."""

    alpha: float = 0.1  # weight of CLIP for classes seen in training
    beta: float = 0.9  # weight of CLIP for unseen classes


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
        if self.image_size % 32:
            raise ConfigError(f"image_size must be a multiple of 32 (CLIP's coarsest stride), got {self.image_size}")
        if unknown := set(self.weights) - set(WEIGHT_ROLES):
            raise ConfigError(f"unknown weight roles {sorted(unknown)}; known: {list(WEIGHT_ROLES)}")
        if self.adapter.embed_dim % self.adapter.num_heads:
            raise ConfigError("adapter.embed_dim must be divisible by adapter.num_heads")

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
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> "OVSAMConfig":
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
                data["seen_classes"] = tuple(data["seen_classes"])
            if "adapter" in data:
                data["adapter"] = dataclasses.replace(
                    data["adapter"], global_attn_indexes=tuple(data["adapter"].global_attn_indexes)
                )
            return cls(**data)
        except TypeError as err:
            raise ConfigError(f"{source}: {err}") from err


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
    return OVSAMConfig.from_dict(data, source=str(path))
