"""The typed configuration of one labelling run, validated once where it enters (the CLI)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from ovsam.config import AutomaticConfig
from ovsam.redaction import redact_uri
from pipelines.storage import STORAGE_ATTEMPTS, nested_location

Mode = Literal["auto", "box"]
MODES: tuple[Mode, ...] = ("auto", "box")
# Manifests that may carry box prompts in their rows (`pipelines.inputs.BOX_COLUMNS`).
BOX_MANIFEST_SUFFIXES = (".csv", ".parquet")
WEIGHT_PARTS = ("sam2clip", "clip2sam", "sam", "clip")


class ConfigError(ValueError):
    """An option value or combination that cannot work; the message names the option."""


@dataclasses.dataclass(frozen=True)
class LabelConfig:
    """Everything a labelling run needs. Paths are local paths or fsspec URLs (``s3://...``).

    ``input``: folder / prefix (optionally with a glob such as ``s3://b/imgs/**/*.jpg``), one image, or a manifest
    file (text, one URI per line; or CSV/Parquet with a ``uri`` column and optional boxes, `pipelines.inputs`). ``output``: prefix the tables are written under.
    ``prompts``: COCO JSON or Parquet of boxes per image (box mode only). ``preset``: model preset name,
    preset JSON or model directory (`ovsam.load_model`). ``weights``: part name →
    checkpoint location, overriding the preset's. ``workers``: model actors (None: one per GPU, else 1).
    ``batch_size``: images per model call. ``part_size``: a writer publishes a part once it holds this many images
    (less than a batch more), or `pipelines.output.PART_MAX_BYTES`. ``flush_interval``: seconds after which a writer publishes
    what it holds, whatever its size (what a kill can lose per writer). ``limit``: label at most N images that the
    output does not hold yet (of a folder into a new output: the first N listed; otherwise any N), for trying a command. ``runtime_env``: Ray runtime_env for the run's workers
    (`load_runtime_env`). ``endpoint_url``: S3-compatible endpoint (else ``AWS_ENDPOINT_URL`` or AWS).
    ``storage_attempts``: tries per storage request (read, listing, write) before a transient fault counts as
    outlasting the retries (`pipelines.storage.storage_options`). ``compile``: each model worker runs the image
    encoder under ``torch.compile`` (`ovsam.Predictor`'s ``compile_encoder``; a speed setting: not compared on
    resume).
    """

    input: str
    output: str
    mode: Mode = "auto"
    prompts: str | None = None
    vocabulary: str = "coco"
    preset: str = "tiny"
    weights: tuple[tuple[str, str], ...] = ()
    coco: bool = False
    address: str | None = None
    runtime_env: dict | None = None
    gpus_per_worker: float = 1.0
    workers: int | None = None
    batch_size: int = 8
    part_size: int = 5000
    flush_interval: float = 60.0
    limit: int | None = None
    endpoint_url: str | None = None
    automatic: AutomaticConfig = dataclasses.field(default_factory=AutomaticConfig)
    top_k: int = 5
    storage_attempts: int = STORAGE_ATTEMPTS
    compile: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"--mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.mode == "box" and not self.prompts and not self.input.lower().endswith(BOX_MANIFEST_SUFFIXES):
            raise ConfigError("--mode box needs --prompts (a COCO JSON or Parquet file of boxes per image) or a "
                              "CSV/Parquet manifest with box columns as INPUT")
        if self.mode == "auto" and self.prompts:
            raise ConfigError("--prompts is only used with --mode box")
        for part, _ in self.weights:
            if part not in WEIGHT_PARTS:
                raise ConfigError(f"--weights part must be one of {', '.join(WEIGHT_PARTS)}, not {part!r}")
        if self.gpus_per_worker < 0:
            raise ConfigError("--gpus-per-worker must be >= 0")
        if self.flush_interval <= 0:
            raise ConfigError(f"--flush-interval must be > 0 seconds, got {self.flush_interval}")
        for name, value, low in (("--workers", self.workers, 1), ("--batch-size", self.batch_size, 1),
                                 ("--part-size", self.part_size, 1),
                                 ("--limit", self.limit, 1),
                                 ("--top-k", self.top_k, 1), ("--storage-attempts", self.storage_attempts, 1)):
            if value is not None and value < low:
                raise ConfigError(f"{name} must be >= {low}, got {value}")
        if problem := nested_location(self.input, self.output):
            raise ConfigError(problem)

    def public_dict(self) -> dict:
        """The config as JSON-ready values with credentials removed from every URL (for run.json and logs)."""
        values = dataclasses.asdict(self)
        for key in ("input", "output", "prompts", "preset", "endpoint_url", "address"):
            if values[key]:
                values[key] = redact_uri(values[key])
        values["weights"] = {part: redact_uri(source) for part, source in self.weights}
        # env_vars or pip index URLs may hold secrets: only which fields were set is recorded.
        values["runtime_env"] = sorted(self.runtime_env) if self.runtime_env else None
        return values


def load_runtime_env(path: str) -> dict:
    """A Ray ``runtime_env`` from a JSON file, e.g. ``{"pip": ["ovsam-batch @ s3://.../ovsam_batch.whl"]}`` or
    ``{"working_dir": ".", "pip": ["-e ."]}``: what Ray installs on every node before the run's workers start."""
    import json

    try:
        with open(path) as source:
            env = json.load(source)
    except (OSError, ValueError) as err:
        raise ConfigError(f"--runtime-env {path}: cannot read it as JSON: {err}") from None
    if not isinstance(env, dict):
        raise ConfigError(f"--runtime-env {path} must hold a JSON object (Ray runtime_env fields), "
                          f"not {type(env).__name__}")
    return env
