"""ovsam.vocabulary: class vocabularies, synonym splitting and cached CLIP text embeddings.

Embeddings come from a real (tiny, seeded, randomly initialised) open_clip text tower and the real BPE
tokenizer that ships with open_clip, so everything runs offline and fast.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

from ovsam.errors import VocabularyError
from ovsam.vocabulary import VILD_TEMPLATES, Vocabulary, embed_vocabulary, split_synonyms

EMBED_DIM = 16


@pytest.fixture(scope="module")
def clip_model() -> CLIP:
    torch.manual_seed(0)
    model = CLIP(
        embed_dim=EMBED_DIM,
        vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=16, image_size=32),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
    )
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("RN50")


class _CountingEncoder:
    """Wraps ``encode_text`` and counts the prompts it embeds."""

    def __init__(self, model: CLIP) -> None:
        self.model = model
        self.prompts = 0

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.prompts += len(tokens)
        return self.model.encode_text(tokens)


def _embed(vocabulary, encoder, tokenizer, cache_dir, fingerprint="tiny-text-tower-v1"):
    return embed_vocabulary(
        vocabulary, encoder, tokenizer, text_tower_fingerprint=fingerprint, cache_dir=cache_dir, batch_size=50
    )


@pytest.mark.parametrize(
    ("class_string", "synonyms"),
    [
        ("aerosol_can", ["aerosol can"]),
        ("ball_or_sphere", ["ball", "sphere"]),
        ("bicycle,bike/cycle", ["bicycle", "bike", "cycle"]),
        ("Traffic Light", ["traffic light"]),
        ("person, child ,girl", ["person", "child", "girl"]),
        ("tape_(sticky_cloth_or_paper)", ["tape (sticky cloth", "paper)"]),  # as the official rule splits it
        ("cat,,", ["cat"]),
    ],
)
def test_split_synonyms(class_string: str, synonyms: list[str]) -> None:
    assert split_synonyms(class_string) == synonyms


def test_vild_templates() -> None:
    assert len(VILD_TEMPLATES) == 14 == len(set(VILD_TEMPLATES))
    assert all(template.count("{}") == 1 for template in VILD_TEMPLATES)
    assert "There is the {} in the scene" in VILD_TEMPLATES and "a photo of a {}." in VILD_TEMPLATES


def test_builtin_coco() -> None:
    coco = Vocabulary.from_spec("coco")
    assert len(coco) == 80 and coco.name == "coco"
    assert len(coco.base_ids) == 48 and len(coco.novel_ids) == 17
    assert coco.names[:3] == ("person", "bicycle", "car") and coco.names[9] == "traffic light"
    assert coco.synonyms[1] == ("bicycle", "bicycles", "bike", "bikes")
    assert not set(coco.base_ids) & set(coco.novel_ids)


def test_builtin_lvis_uses_category_names_in_id_order() -> None:
    data = json.loads(resources.files("ovsam").joinpath("vocabularies", "lvis_v1.json").read_text("utf-8"))
    lvis = Vocabulary.from_spec("LVIS")
    assert len(lvis) == len(data["categories"]) == 1203
    assert (len(lvis.base_ids), len(lvis.novel_ids)) == (len(data["base_ids"]), len(data["rare_ids"]))
    by_id = sorted(data["categories"], key=lambda category: category["id"])
    assert lvis.class_strings == tuple(category["name"] for category in by_id)
    assert lvis.names[0] == "aerosol can"
    rare = [category["name"] for category in by_id if category["frequency"] == "r"]
    assert [lvis.class_strings[i] for i in lvis.novel_ids] == rare


def test_builtin_files_ship_unchanged() -> None:
    shared = Path("/work/shared/vocab")
    if not shared.is_dir():
        pytest.skip("shared vocab directory not on this machine")
    for name in ("coco_ov.json", "lvis_v1.json"):
        packaged = resources.files("ovsam").joinpath("vocabularies", name).read_bytes()
        assert packaged == (shared / name).read_bytes()


def test_fingerprint_and_properties() -> None:
    vocabulary = Vocabulary.from_spec("cat,dog,traffic light")
    assert vocabulary.names == ("cat", "dog", "traffic light") and len(vocabulary) == 3
    assert vocabulary.base_ids is None and vocabulary.novel_ids is None
    assert vocabulary.fingerprint == Vocabulary("other", ("cat", "dog", "traffic light")).fingerprint
    assert vocabulary.fingerprint != Vocabulary.from_spec("cat,dog,traffic lights").fingerprint
    assert len(vocabulary.fingerprint) == 64


def test_embedding_shape_padding_and_norms(clip_model, tokenizer, tmp_path: Path) -> None:
    vocabulary = Vocabulary("test", ("cat", "ball_or_sphere", "bicycle,bike/cycle"))
    embeddings = _embed(vocabulary, _CountingEncoder(clip_model), tokenizer, tmp_path)
    assert embeddings.shape == (3, 3, EMBED_DIM) and embeddings.dtype == torch.float32
    assert embeddings.device.type == "cpu" and not embeddings.is_inference()
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(3, 3))
    assert torch.equal(embeddings[0, 1], embeddings[0, 0]) and torch.equal(embeddings[0, 2], embeddings[0, 0])
    assert torch.equal(embeddings[1, 2], embeddings[1, 0]) and not torch.equal(embeddings[1, 1], embeddings[1, 0])
    assert len({tuple(embeddings[2, p].tolist()) for p in range(3)}) == 3  # three distinct synonyms


def test_prototype_is_normalised_mean_of_normalised_templates(clip_model, tokenizer, tmp_path: Path) -> None:
    vocabulary = Vocabulary("test", ("cat", "bicycle,bike/cycle"))
    embeddings = _embed(vocabulary, _CountingEncoder(clip_model), tokenizer, tmp_path)
    with torch.no_grad():
        per_template = clip_model.encode_text(tokenizer([template.format("bike") for template in VILD_TEMPLATES]))
    per_template = per_template / per_template.norm(dim=-1, keepdim=True)
    expected = per_template.mean(dim=0)
    expected = expected / expected.norm()
    torch.testing.assert_close(embeddings[1, 1], expected, rtol=1e-5, atol=1e-6)
    # Averaging raw (unnormalised) template embeddings gives a different vector: the order matters.
    with torch.no_grad():
        raw_mean = F.normalize(
            clip_model.encode_text(tokenizer([t.format("bike") for t in VILD_TEMPLATES])).mean(dim=0), dim=-1
        )
    assert not torch.allclose(raw_mean, expected, atol=1e-6)


def test_coco_embedding(clip_model, tokenizer, tmp_path: Path) -> None:
    coco = Vocabulary.from_spec("coco")
    encoder = _CountingEncoder(clip_model)
    embeddings = _embed(coco, encoder, tokenizer, tmp_path)
    most_synonyms = max(len(synonyms) for synonyms in coco.synonyms)  # "person,child,girl,..." has 17
    assert embeddings.shape == (80, most_synonyms, EMBED_DIM)
    assert encoder.prompts == len(VILD_TEMPLATES) * sum(len(synonyms) for synonyms in coco.synonyms)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(80, most_synonyms))
    car_slots = len(coco.synonyms[2])  # "car,cars"
    assert torch.equal(embeddings[2, car_slots:], embeddings[2, :1].expand(most_synonyms - car_slots, -1))


def test_cache_hit_skips_encoder_and_key_depends_on_inputs(clip_model, tokenizer, tmp_path: Path) -> None:
    vocabulary = Vocabulary.from_spec("cat,dog")
    first_encoder = _CountingEncoder(clip_model)
    first = _embed(vocabulary, first_encoder, tokenizer, tmp_path)
    assert first_encoder.prompts == 2 * len(VILD_TEMPLATES)
    assert len(list(tmp_path.glob("*.pt"))) == 1 and not list(tmp_path.glob("*.part"))

    cached_encoder = _CountingEncoder(clip_model)
    assert torch.equal(_embed(vocabulary, cached_encoder, tokenizer, tmp_path), first)
    assert cached_encoder.prompts == 0

    other_tower = _CountingEncoder(clip_model)
    _embed(vocabulary, other_tower, tokenizer, tmp_path, fingerprint="tiny-text-tower-v2")
    other_names = _CountingEncoder(clip_model)
    _embed(Vocabulary.from_spec("cat,dogs"), other_names, tokenizer, tmp_path)
    assert other_tower.prompts > 0 and other_names.prompts > 0
    assert len(list(tmp_path.glob("*.pt"))) == 3


def test_corrupt_cache_file_is_recomputed(clip_model, tokenizer, tmp_path: Path) -> None:
    vocabulary = Vocabulary.from_spec("cat,dog")
    first = _embed(vocabulary, _CountingEncoder(clip_model), tokenizer, tmp_path)
    (cache_file,) = tmp_path.glob("*.pt")
    cache_file.write_bytes(cache_file.read_bytes()[:100])
    encoder = _CountingEncoder(clip_model)
    torch.testing.assert_close(_embed(vocabulary, encoder, tokenizer, tmp_path), first)
    assert encoder.prompts == 2 * len(VILD_TEMPLATES)


def test_cache_dir_defaults_to_environment(clip_model, tokenizer, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("OVSAM_CACHE_DIR", str(tmp_path))
    embed_vocabulary(Vocabulary.from_spec("cat"), clip_model.encode_text, tokenizer, text_tower_fingerprint="t")
    assert len(list((tmp_path / "vocab").glob("*.pt"))) == 1


def test_from_spec_txt(tmp_path: Path) -> None:
    path = tmp_path / "classes.txt"
    path.write_text("# my classes\ncat\n\nbicycle,bike\n  traffic_light  \n", encoding="utf-8")
    vocabulary = Vocabulary.from_spec(str(path))
    assert vocabulary.class_strings == ("cat", "bicycle,bike", "traffic_light")
    assert vocabulary.names == ("cat", "bicycle", "traffic light") and vocabulary.name == "classes"


def test_from_spec_json(tmp_path: Path) -> None:
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(["cat", "dog"]))
    assert Vocabulary.from_spec(str(plain)).class_strings == ("cat", "dog")
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"classes": ["cat", "dog", "bird"], "base_ids": [0, 2], "novel_ids": [1]}))
    vocabulary = Vocabulary.from_spec(str(split))
    assert vocabulary.base_ids == (0, 2) and vocabulary.novel_ids == (1,)


def test_from_spec_comma_list_keeps_each_item_one_class() -> None:
    vocabulary = Vocabulary.from_spec("cat, dog ,traffic light,bicycle/bike")
    assert vocabulary.class_strings == ("cat", "dog", "traffic light", "bicycle/bike")
    assert vocabulary.synonyms[3] == ("bicycle", "bike")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty class name at position 1"),
        ("cat,,dog", "empty class name at position 2"),
        ("cat,dog,Cat", r"class 2 \('Cat'\) duplicates class 0 \('cat'\)"),
        ("/nonexistent/classes.txt", "cannot read vocabulary file /nonexistent/classes.txt: no such file"),
    ],
)
def test_from_spec_errors(spec: str, message: str) -> None:
    with pytest.raises(VocabularyError, match=message):
        Vocabulary.from_spec(spec)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("comments.txt", "# nothing here\n\n", "has no classes"),
        ("binary.txt", b"\xff\xfe\x00cat", "cannot read vocabulary file .*UnicodeDecodeError"),
        ("broken.json", "[\"cat\", ", "is not valid JSON"),
        ("object.json", json.dumps({"names": ["cat"]}), "must hold a list of class strings"),
        ("ids.json", json.dumps({"classes": ["cat"], "base_ids": ["0"]}), "'base_ids' must be a list of integers"),
        ("range.json", json.dumps({"classes": ["cat", "dog"], "novel_ids": [2]}), r"novel_ids \[2\] are outside 0..1"),
        ("both.json", json.dumps({"classes": ["a", "b"], "base_ids": [0], "novel_ids": [0]}), "both base and novel"),
        ("types.json", json.dumps(["cat", 3]), "class 1 is a int, not a string"),
        ("classes.csv", "cat\n", "unsupported type"),
    ],
)
def test_from_file_errors(tmp_path: Path, name: str, content: str | bytes, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(VocabularyError, match=message):
        Vocabulary.from_spec(str(path))


def test_seen_classes_come_from_the_weights_not_the_run_vocabulary() -> None:
    """The README's own example: COCO weights with the LVIS vocabulary. Only the LVIS classes that are one of
    COCO's 48 base classes (by normalised synonym) are seen; the other LVIS classes, base or not, are novel."""
    import ovsam

    coco_weights = ovsam.load_config("coco_rn50x16")[0].seen_classes
    lvis_weights = ovsam.load_config("lvis_rn50x16")[0].seen_classes
    coco, lvis = Vocabulary.from_spec("coco"), Vocabulary.from_spec("lvis")
    # Same vocabulary as training: exactly the base split.
    assert np.flatnonzero(coco.seen_by(coco_weights)).tolist() == sorted(coco.base_ids)
    assert np.flatnonzero(lvis.seen_by(lvis_weights)).tolist() == sorted(lvis.base_ids)
    # Across vocabularies: a few dozen LVIS classes, not LVIS's own 866 base classes.
    seen = lvis.seen_by(coco_weights)
    assert 20 <= seen.sum() <= 48
    names = dict(zip(lvis.names, seen))
    assert names["zebra"] and names["giraffe"] and names["person"]  # COCO base classes
    assert not names["cat"] and not names["dog"]  # COCO novel classes
    assert not names["aerosol can"]  # LVIS base, never in COCO
    # A comma list: matched by normalised synonym ("Bike" is one of COCO's "bicycle" synonyms).
    custom = Vocabulary.from_spec("Bike,tv_remote,cat,unicorn")
    assert custom.seen_by(coco_weights).tolist() == [True, True, False, False]
    # Weights that do not say what they were trained on: every class is novel.
    assert not custom.seen_by(None).any()
