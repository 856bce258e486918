"""Reading a golden directory (official-code test vectors): its config.json describes the official model in
the official code's terms; this turns it into an ovsam preset file plus weight overrides, so the model is
built and loaded through `ovsam.load_model`, the path a user takes. Nothing about one particular golden set
is assumed: dimensions, file names, class split and prompts all come from the directory.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_GOLDEN_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "golden"


def golden_dir() -> Path:
    return Path(os.environ.get("OVSAM_GOLDEN_DIR", DEFAULT_GOLDEN_DIR)).resolve()


def _weight_file(directory: Path, description: str) -> str:
    """The `weights/...pth` path inside a free-text checkpoint description of config.json."""
    match = re.search(r"weights/[\w.\-]+\.pth", description)
    if not match:
        raise ValueError(f"no weights/*.pth path in {description!r}")
    return str(directory / match.group(0))


@dataclass
class Golden:
    directory: Path
    preset: dict
    weights: dict[str, str]
    class_embedding_file: Path
    base_ids: list[int]
    novel_ids: list[int]
    num_classes: int

    def load(self, name: str) -> dict[str, np.ndarray]:
        with np.load(self.directory / name) as data:
            return {k: data[k] for k in data.files}

    def write_preset(self, path: Path) -> Path:
        path.write_text(json.dumps(self.preset))
        return path


def read_golden(directory: Path) -> Golden:
    cfg = json.loads((directory / "config.json").read_text())
    model = cfg["model"]
    backbone, neck, head = model["backbone"], model["neck_SAM2CLIP"], model["mask_decoder_head"]
    hard = neck["hard_coded"]
    transformer = head["sam_mask_decoder"]["TwoWayTransformer"]
    roi_size = int(re.search(r"output_size=(\d+)", head["roi_extractor"]["roi_layer"]).group(1))
    preset = {
        "name": f"golden-{directory.name}",
        "image_size": neck["input_size"][0],
        "clip": {"arch": backbone["model_name"], "open_clip_config": backbone["open_clip_config_override"]},
        "adapter": {
            "embed_dim": neck["embed_channels"],
            "depth": hard["depth"],
            "num_heads": hard["num_heads"],
            "window_size": hard["window_size"],
            "global_attn_indexes": hard["global_attn_indexes"],
            "mlp_ratio": hard["mlp_ratio"],
        },
        "decoder": {
            "dim": head["sam_mask_decoder"]["transformer_dim"],
            "depth": transformer["depth"],
            "num_heads": transformer["num_heads"],
            "mlp_dim": transformer["mlp_dim"],
            "mask_in_chans": model["prompt_encoder"]["mask_in_chans"],
            "roi_size": roi_size,
            "finest_scale": head["roi_extractor"]["finest_scale"],
        },
        "fusion": {"alpha": model["OVSAM"]["alpha"], "beta": model["OVSAM"]["beta"]},
        "trained": False,
    }
    weights = {
        "sam2clip": _weight_file(directory, neck["init_cfg"]["checkpoint"]),
        "clip2sam": _weight_file(directory, head["init_cfg"]["checkpoint"]),
        "sam": _weight_file(directory, model["prompt_encoder"]["init_cfg"]["checkpoint"]),
        "clip": _weight_file(directory, backbone["init_cfg"]["checkpoint"]),
    }
    return Golden(
        directory=directory,
        preset=preset,
        weights=weights,
        class_embedding_file=directory / "weights" / f"{head['ov_classifier_name']}.pth",
        base_ids=list(model["OVSAM"]["base_classes"]),
        novel_ids=list(model["OVSAM"]["novel_classes"]),
        num_classes=model["OVSAM"]["num_classes"],
    )


def tolerance(golden: np.ndarray) -> float:
    """README §9: atol = 1e-4 + 1e-4 * max|golden| per tensor (entries at -1000 excluded)."""
    finite = golden[golden != -1000.0] if golden.dtype.kind == "f" else golden
    return 1e-4 + 1e-4 * float(np.abs(finite).max()) if finite.size else 1e-4
