"""The real-size released configurations have exactly the official key names and shapes.

Built on PyTorch's meta device: no memory for the 430M parameters, nothing downloaded.
"""

from __future__ import annotations

import re

import pytest
import torch

from ovsam.config import load_config
from ovsam.model import OVSAM, RELEASE_PREFIXES
from tests.golden import golden_dir

# Section headers of keys_real_release.txt: which of our weight roles / key prefixes each one lists.
SECTION_PREFIXES = {
    "MultiLayerTransformerNeck": "neck_student",
    "mmdet FPN": "fpn_neck",
    "OVSAMHead": "mask_decoder",
    "SAMPromptEncoder": "prompt_encoder",
    "open_clip RN50x16": "",
}


def read_key_listing(path) -> dict[str, dict[str, tuple[tuple[int, ...], str]]]:
    """{section prefix: {key: (shape, dtype)}} from a `## header` / `key<TAB>[shape]<TAB>dtype` listing."""
    sections: dict[str, dict] = {}
    current = None
    for line in path.read_text().splitlines():
        if line.startswith("## ") and not re.match(r"## \d+ tensors", line):
            current = next(prefix for name, prefix in SECTION_PREFIXES.items() if name in line)
            sections[current] = {}
        elif line.strip() and not line.startswith("#"):
            key, shape, dtype = line.split("\t")
            sections[current][key] = (tuple(int(d) for d in shape.strip("[]").split(",") if d.strip()), dtype)
    return sections


@pytest.mark.parametrize("preset", ["coco_rn50x16", "lvis_rn50x16"])
def test_released_configuration_has_release_keys(preset):
    listing = read_key_listing(golden_dir() / "keys_real_release.txt")
    config, _ = load_config(preset)
    with torch.device("meta"):
        model = OVSAM(config)
    ours: dict[str, dict] = {}
    for parts in RELEASE_PREFIXES.values():
        for prefix, attribute in parts:
            ours[prefix] = {
                (f"{prefix}.{key}" if prefix else key): (tuple(t.shape), str(t.dtype).removeprefix("torch."))
                for key, t in model.get_submodule(attribute).state_dict().items()
            }
    assert set(ours) == set(listing)
    for prefix, expected in listing.items():
        assert ours[prefix] == expected, f"{prefix or 'open_clip'}: keys or shapes differ"
