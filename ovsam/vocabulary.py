"""Class vocabularies and their CLIP text embeddings (the open-vocabulary classifier).

A class is given as one string that may hold several synonyms (``"bicycle,bike"``, ``"ball_or_sphere"``).
Each synonym is put through the 14 ViLD prompt templates and embedded by the CLIP text tower; the template
embeddings are L2-normalised, averaged and re-normalised, giving one prototype per synonym. A class keeps
all its prototypes (padded with its first to the largest synonym count P of the vocabulary), and the
classifier takes the max over prototypes. This reproduces how the released OVSAM class-embedding files
were made (the release's ``tools/gen_cls.py``, shared with OMG-Seg: split, template, normalise, mean,
normalise, pad with the first synonym).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import VocabularyError, WeightsError
from .weights import cache_root, load_tensor

logger = logging.getLogger(__name__)

# The 14 ViLD prompt templates, in the order used by FC-CLIP (github.com/bytedance/fc-clip,
# fcclip/fcclip.py, VILD_PROMPT) and copied from there into the OVSAM/OMG-Seg code base
# (ext/templates/vild.py) that generated the released class embeddings. The order matters only for
# floating-point summation; the missing final periods on some entries are as in the source.
VILD_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "This is a photo of a {}",
    "There is a {} in the scene",
    "There is the {} in the scene",
    "a photo of a {} in the scene",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "There is a small {} in the scene.",
    "There is a medium {} in the scene.",
    "There is a large {} in the scene.",
)

# Bumped whenever the embedding recipe changes, so stale cache files are never reused.
_EMBEDDING_CACHE_VERSION = 1
_BUILTIN_PACKAGE_DIR = "vocabularies"
_VOCABULARY_FILE_SUFFIXES = (".txt", ".json")


def split_synonyms(class_string: str) -> list[str]:
    """Synonyms of one class string, in order: ``_or_``, ``/`` and ``,`` separate synonyms, ``_`` is a space.

    Lower-cased and stripped; empty pieces are dropped. ``"aerosol_can"`` → ``["aerosol can"]``,
    ``"ball_or_sphere"`` → ``["ball", "sphere"]``, ``"bicycle,bike/cycle"`` → ``["bicycle", "bike", "cycle"]``.
    """
    normalised = class_string.replace("_or_", ",").replace("/", ",").replace("_", " ").lower()
    return [piece.strip() for piece in normalised.split(",") if piece.strip()]


@dataclass(frozen=True)
class Vocabulary:
    """An ordered list of K classes; class ``k`` is the label id ``k`` in every prediction.

    ``class_strings`` are the raw strings (synonyms still joined); ``base_ids`` / ``novel_ids`` are 0-based
    indexes of the classes seen / not seen when the CLIP2SAM weights were trained (``None`` when the
    vocabulary has no such split). Classes in neither list (15 of COCO's 80) are simply not part of the
    open-vocabulary benchmark. Validated on construction: raises :class:`VocabularyError`.
    """

    name: str
    class_strings: tuple[str, ...]
    base_ids: tuple[int, ...] | None = None
    novel_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_strings", tuple(self.class_strings))
        for field in ("base_ids", "novel_ids"):
            ids = getattr(self, field)
            if ids is not None:
                object.__setattr__(self, field, tuple(int(i) for i in ids))
        if not self.class_strings:
            raise VocabularyError(f"vocabulary {self.name!r} has no classes")
        first_seen: dict[tuple[str, ...], int] = {}
        for index, class_string in enumerate(self.class_strings):
            if not isinstance(class_string, str):
                raise VocabularyError(
                    f"vocabulary {self.name!r}: class {index} is a {type(class_string).__name__}, not a string"
                )
            synonyms = tuple(split_synonyms(class_string))
            if not synonyms:
                raise VocabularyError(f"vocabulary {self.name!r}: class {index} ({class_string!r}) is empty")
            if synonyms in first_seen:
                raise VocabularyError(
                    f"vocabulary {self.name!r}: class {index} ({class_string!r}) duplicates class "
                    f"{first_seen[synonyms]} ({self.class_strings[first_seen[synonyms]]!r})"
                )
            first_seen[synonyms] = index
        self._check_split()

    def _check_split(self) -> None:
        count = len(self.class_strings)
        for field in ("base_ids", "novel_ids"):
            ids = getattr(self, field)
            if ids is None:
                continue
            out_of_range = [i for i in ids if not 0 <= i < count]
            if out_of_range:
                raise VocabularyError(
                    f"vocabulary {self.name!r}: {field} {out_of_range[:8]} are outside 0..{count - 1}"
                )
            if len(set(ids)) != len(ids):
                raise VocabularyError(f"vocabulary {self.name!r}: {field} lists a class twice")
        if self.base_ids is not None and self.novel_ids is not None:
            both = sorted(set(self.base_ids) & set(self.novel_ids))
            if both:
                raise VocabularyError(f"vocabulary {self.name!r}: classes {both[:8]} are both base and novel")

    def __len__(self) -> int:
        return len(self.class_strings)

    @functools.cached_property
    def synonyms(self) -> tuple[tuple[str, ...], ...]:
        """Per class, its synonyms as embedded (see :func:`split_synonyms`)."""
        return tuple(tuple(split_synonyms(class_string)) for class_string in self.class_strings)

    @property
    def names(self) -> tuple[str, ...]:
        """Display name of each class: its first synonym."""
        return tuple(class_synonyms[0] for class_synonyms in self.synonyms)

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 hex digest of the class strings, in order (the split does not change the embeddings)."""
        return hashlib.sha256(json.dumps(list(self.class_strings)).encode()).hexdigest()

    def seen_by(self, seen_classes: Sequence[str] | None) -> np.ndarray:
        """``[K] bool``: True for the classes a head trained on ``seen_classes`` (class strings) has seen.

        A class is seen when one of its synonyms (normalised by :func:`split_synonyms`) is a synonym of a
        training class, so ``"car"`` is seen by COCO's ``"car,cars"``; ``None`` (unknown training classes)
        marks every class novel.
        """
        mask = np.zeros(len(self), dtype=bool)
        if seen_classes is None:
            return mask
        known = {synonym for class_string in seen_classes for synonym in split_synonyms(class_string)}
        for index, class_synonyms in enumerate(self.synonyms):
            mask[index] = any(synonym in known for synonym in class_synonyms)
        return mask

    @classmethod
    def from_spec(cls, spec: str) -> Vocabulary:
        """Build a vocabulary from a user-facing spec.

        * ``"coco"``: the 80 COCO classes (comma-separated synonym strings) with the 48 base / 17 novel split;
        * ``"lvis"``: the 1203 LVIS v1 category names in id order; base = the "norare" training classes,
          novel = the rare classes;
        * a path ending in ``.txt`` (one class per line; blank lines and lines starting with ``#`` ignored)
          or ``.json`` (a list of class strings, or ``{"classes": [...], "base_ids": [...], "novel_ids": [...]}``);
        * otherwise a comma list ``"cat,dog,traffic light"``: each item is one class (``/`` and ``_or_``
          still separate synonyms inside an item).
        """
        key = spec.strip()
        if key.lower() == "coco":
            return _builtin_coco()
        if key.lower() == "lvis":
            return _builtin_lvis()
        path = Path(key).expanduser()
        if path.suffix.lower() in _VOCABULARY_FILE_SUFFIXES:
            return _from_file(path)
        if key and path.exists():
            raise VocabularyError(
                f"vocabulary file {key} has an unsupported type; use a .txt file (one class per line) or a .json file"
            )
        return _from_comma_list(key)


def _read_builtin(file_name: str) -> dict:
    return json.loads(resources.files("ovsam").joinpath(_BUILTIN_PACKAGE_DIR, file_name).read_text("utf-8"))


@functools.cache
def _builtin_coco() -> Vocabulary:
    data = _read_builtin("coco_ov.json")
    return Vocabulary("coco", tuple(data["classes"]), tuple(data["base_ids"]), tuple(data["novel_ids"]))


@functools.cache
def _builtin_lvis() -> Vocabulary:
    data = _read_builtin("lvis_v1.json")
    # The official classifier embeds the category *names* in id order, not the LVIS synonym lists.
    names = tuple(category["name"] for category in sorted(data["categories"], key=lambda c: c["id"]))
    return Vocabulary("lvis", names, tuple(data["base_ids"]), tuple(data["rare_ids"]))


def _from_comma_list(spec: str) -> Vocabulary:
    items = [item.strip() for item in spec.split(",")]
    empty = [position for position, item in enumerate(items, start=1) if not item]
    if empty:
        raise VocabularyError(
            f"vocabulary {spec!r} has an empty class name at position {empty[0]} "
            "(expected a comma-separated list like 'cat,dog,traffic light', 'coco', 'lvis' or a .txt/.json file)"
        )
    return Vocabulary("custom", tuple(items))


def _from_file(path: Path) -> Vocabulary:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = "no such file" if isinstance(error, FileNotFoundError) else f"{type(error).__name__}: {error}"
        raise VocabularyError(f"cannot read vocabulary file {path}: {reason}") from error
    if path.suffix.lower() == ".txt":
        lines = (line.strip() for line in text.splitlines())
        return Vocabulary(path.stem, tuple(line for line in lines if line and not line.startswith("#")))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise VocabularyError(f"vocabulary file {path} is not valid JSON: {error}") from error
    if isinstance(data, list):
        data = {"classes": data}
    if not isinstance(data, dict) or not isinstance(data.get("classes"), list):
        raise VocabularyError(
            f"vocabulary file {path} must hold a list of class strings or an object with a \"classes\" list"
        )
    split = {}
    for field in ("base_ids", "novel_ids"):
        ids = data.get(field)
        if ids is not None and not (isinstance(ids, list) and all(isinstance(i, int) for i in ids)):
            raise VocabularyError(f"vocabulary file {path}: {field!r} must be a list of integers")
        split[field] = None if ids is None else tuple(ids)
    return Vocabulary(path.stem, tuple(data["classes"]), **split)


def _cache_key(vocabulary: Vocabulary, text_tower_fingerprint: str) -> str:
    payload = {
        "version": _EMBEDDING_CACHE_VERSION,
        "text_tower": text_tower_fingerprint,
        "classes": list(vocabulary.class_strings),
        "templates": list(VILD_TEMPLATES),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def embed_vocabulary(
    vocabulary: Vocabulary,
    encode_text: Callable[[torch.Tensor], torch.Tensor],
    tokenize: Callable[[list[str]], torch.Tensor],
    *,
    text_tower_fingerprint: str,
    cache_dir: Path | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Class embeddings of ``vocabulary``: ``[K, P, E]`` float32 on the CPU, every prototype L2-normalised.

    ``P`` is the largest synonym count in the vocabulary; class ``k`` holds one prototype per synonym,
    padded with its first. A prototype is the normalised mean of the normalised CLIP text embeddings of
    the synonym in the 14 :data:`VILD_TEMPLATES`.

    ``tokenize`` maps prompts to token ids (e.g. ``open_clip.get_tokenizer(name)``); ``encode_text`` maps
    those CPU token ids to ``[N, E]`` embeddings (move them to the model's device inside it). Both run under
    ``torch.inference_mode()`` in batches of ``batch_size`` prompts. The result is cached in ``cache_dir``
    (default ``$OVSAM_CACHE_DIR/vocab`` or ``~/.cache/ovsam/vocab``) under a file named by the hash of
    ``text_tower_fingerprint`` (which must change whenever the text tower's weights do), the class strings
    and the templates; a cache hit never calls ``encode_text``. The returned tensor is an ordinary tensor
    (usable in autograd), not an inference-mode one.
    """
    directory = cache_dir if cache_dir is not None else cache_root() / "vocab"
    cache_file = directory / f"{_cache_key(vocabulary, text_tower_fingerprint)}.pt"
    counts = [len(class_synonyms) for class_synonyms in vocabulary.synonyms]
    prototypes_per_class = max(counts)
    if cache_file.is_file():
        try:
            cached = load_tensor(cache_file)
        except WeightsError as error:
            logger.warning("ignoring unreadable vocabulary embedding cache, recomputing: %s", error)
        else:
            if cached.dim() == 3 and cached.shape[:2] == (len(vocabulary), prototypes_per_class):
                return cached.float()
            logger.warning(
                "ignoring vocabulary embedding cache %s of shape %s, recomputing", cache_file, tuple(cached.shape)
            )

    prompts = template_prompts(vocabulary)
    with torch.inference_mode():
        features = torch.cat(
            [
                encode_text(tokenize(prompts[start : start + batch_size])).float().cpu()
                for start in range(0, len(prompts), batch_size)
            ]
        )
        embeddings = prototypes_from_text(features, vocabulary)
    embeddings = embeddings.clone()  # leave inference mode: callers may use it next to trainable tensors

    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{cache_file.stem}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(embeddings, handle)
        os.replace(tmp_name, cache_file)
    finally:
        Path(tmp_name).unlink(missing_ok=True)
    return embeddings


def template_prompts(vocabulary: Vocabulary) -> list[str]:
    """Every synonym of every class in every ViLD template: class-major, then synonym, then template."""
    return [
        template.format(synonym)
        for class_synonyms in vocabulary.synonyms
        for synonym in class_synonyms
        for template in VILD_TEMPLATES
    ]


def prototypes_from_text(features: torch.Tensor, vocabulary: Vocabulary) -> torch.Tensor:
    """Text embeddings of `template_prompts(vocabulary)` [S * T, E] -> class prototypes [K, P, E]."""
    counts = [len(class_synonyms) for class_synonyms in vocabulary.synonyms]
    per_template = F.normalize(features.view(sum(counts), len(VILD_TEMPLATES), -1), dim=-1)
    per_synonym = F.normalize(per_template.mean(dim=1), dim=-1)
    # Row index of each (class, prototype) slot: its own synonym, or the class's first when padding.
    first_rows = torch.tensor(np.cumsum([0, *counts[:-1]]))
    slots = torch.arange(max(counts))
    rows = first_rows[:, None] + torch.where(slots[None, :] < torch.tensor(counts)[:, None], slots[None, :], 0)
    return per_synonym[rows.to(per_synonym.device)]


__all__ = ["VILD_TEMPLATES", "Vocabulary", "embed_vocabulary", "split_synonyms"]
