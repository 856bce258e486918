"""The SAM2CLIP teacher (SAM's image encoder) and the step that precomputes its embeddings once.

The release distils SAM ViT-H's image embeddings and caches them, because the 600M-parameter teacher
costs far more than the student. `precompute` runs the teacher over an SA-1B-layout image folder as a
Ray Data job (an actor pool holds the teacher, one GPU each when asked) and writes one float16
``[256, g, g]`` ``.npy`` per image (``g`` = image size / 16) under an embeddings prefix, with a ``teacher.json`` manifest; images
already embedded are skipped, so a re-run resumes. Each ``.npy`` is published whole (temp + rename, or one
PUT), and a resumed run embeds again any file that is not a whole embedding of the expected shape. An image
that cannot be read becomes an error entry in the manifest (path and reason) and is reported, never silently
dropped.
"""

from __future__ import annotations

import dataclasses
import json
from functools import partial

import click
import fsspec
import numpy as np
import torch
from segment_anything.modeling import ImageEncoderViT
from torch import nn

from jobs.data import DataError, embedding_is_complete, embedding_uri, join, list_images, read_image, write_embedding
from ovsam import weights as weight_io
from ovsam.redaction import redact_uri
from ovsam.transforms import preprocess

MANIFEST_FILE = "teacher.json"
SAM_PATCH_SIZE = 16
SAM_EMBED_CHANNELS = 256  # SAM's image embedding (and prompt) dimension; small test teachers may differ
SAM_LAYER_NORM_EPS = 1e-6
# segment-anything's image encoders (dims of `sam_model_registry`).
SAM_ENCODERS = {
    "vit_h": {"embed_dim": 1280, "depth": 32, "num_heads": 16, "global_attn_indexes": (7, 15, 23, 31)},
    "vit_l": {"embed_dim": 1024, "depth": 24, "num_heads": 16, "global_attn_indexes": (5, 11, 17, 23)},
    "vit_b": {"embed_dim": 768, "depth": 12, "num_heads": 12, "global_attn_indexes": (2, 5, 8, 11)},
}
ENCODER_PREFIX = "image_encoder"


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """A SAM image encoder. ``checkpoint``: a segment-anything checkpoint (local path, URL or hf://) whose
    ``image_encoder.*`` keys are loaded; None gives seeded random weights, which only a config file may ask
    for (tests and the synthetic-shapes recipe, where no SAM checkpoint exists offline)."""

    image_size: int = 1024
    embed_dim: int = 1280
    depth: int = 32
    num_heads: int = 16
    global_attn_indexes: tuple[int, ...] = (7, 15, 23, 31)
    window_size: int = 14
    out_channels: int = SAM_EMBED_CHANNELS
    checkpoint: str | None = None
    seed: int = 0

    @classmethod
    def from_spec(cls, spec: str, checkpoint: str | None, image_size: int = 1024) -> "TeacherConfig":
        """``spec``: ``vit_h``/``vit_l``/``vit_b`` (needs ``checkpoint``; input side ``image_size``) or a JSON
        file of the fields (its own ``image_size``)."""
        if spec in SAM_ENCODERS:
            if checkpoint is None:
                raise DataError(f"teacher {spec} needs its SAM checkpoint (--sam-checkpoint PATH_OR_URL)")
            return cls(image_size=image_size, checkpoint=checkpoint, **SAM_ENCODERS[spec])
        try:
            with fsspec.open(spec, "r") as handle:
                fields = json.load(handle)
        except FileNotFoundError as err:
            raise DataError(f"teacher {spec!r} is neither {', '.join(SAM_ENCODERS)} nor an existing JSON file") from err
        except json.JSONDecodeError as err:
            raise DataError(f"teacher config {spec} is not valid JSON: {err}") from err
        if checkpoint is not None:
            fields["checkpoint"] = checkpoint
        try:
            config = cls(**{**fields, "global_attn_indexes": tuple(fields.get("global_attn_indexes", ()))})
        except TypeError as err:
            raise DataError(f"teacher config {spec}: {err}") from err
        return config

    def build(self) -> nn.Module:
        """The encoder in eval mode: [B, 3, S, S] normalised input -> [B, out_channels, S/16, S/16]."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            encoder = ImageEncoderViT(
                img_size=self.image_size, patch_size=SAM_PATCH_SIZE, embed_dim=self.embed_dim, depth=self.depth,
                num_heads=self.num_heads, mlp_ratio=4.0, out_chans=self.out_channels, qkv_bias=True,
                norm_layer=partial(nn.LayerNorm, eps=SAM_LAYER_NORM_EPS), use_rel_pos=True,
                window_size=self.window_size, global_attn_indexes=self.global_attn_indexes,
            )
        if self.checkpoint is not None:
            state = weight_io.load_state_dict(weight_io.resolve(self.checkpoint))
            weight_io.load_strict(encoder, weight_io.strip_prefix(state, ENCODER_PREFIX), what="SAM image encoder",
                                  source=self.checkpoint)
        return encoder.eval().requires_grad_(False)


class TeacherEmbedder:
    """Ray Data stage: a batch of relative image paths -> embeddings written to storage, one status each."""

    def __init__(self, config: TeacherConfig, images: str, embeddings: str, use_gpu: bool) -> None:
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.encoder = config.build().to(self.device)
        self.image_size = config.image_size
        self.embedding_shape = (config.out_channels, config.image_size // SAM_PATCH_SIZE,
                                config.image_size // SAM_PATCH_SIZE)
        self.images = images
        self.embeddings = embeddings

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [str(p) for p in batch["path"]]
        status = ["" for _ in paths]
        todo, pixels = [], []
        for i, path in enumerate(paths):
            if embedding_is_complete(embedding_uri(self.embeddings, path), self.embedding_shape):
                status[i] = "exists"
                continue
            try:
                pixels.append(preprocess(read_image(join(self.images, path)), self.image_size)[0])
                todo.append(i)
            except (DataError, ValueError) as err:
                status[i] = f"error: {err}"
        if todo:
            with torch.inference_mode():
                embedded = self.encoder(torch.stack(pixels).to(self.device)).half().cpu().numpy()
            for i, embedding in zip(todo, embedded):
                write_embedding(embedding_uri(self.embeddings, paths[i]), embedding)
                status[i] = "written"
        return {"path": np.array(paths), "status": np.array(status)}


@dataclasses.dataclass(frozen=True)
class PrecomputeConfig:
    images: str
    embeddings: str
    teacher: TeacherConfig
    batch_size: int = 4
    concurrency: int = 1
    use_gpu: bool = False
    address: str | None = None


def precompute(config: PrecomputeConfig) -> dict:
    """Embed every image under ``config.images``; return the manifest (also written as ``teacher.json``).

    Manifest: ``teacher`` (the config, checkpoint redacted), ``image_size``, ``written``, ``existing``,
    ``errors`` [{path, error}].
    """
    import ray

    if config.address is not None or not ray.is_initialized():
        ray.init(address=config.address, ignore_reinit_error=True)
    paths = list_images(config.images)
    dataset = ray.data.from_items([{"path": p} for p in paths]).map_batches(
        TeacherEmbedder,
        fn_constructor_kwargs={"config": config.teacher, "images": config.images, "embeddings": config.embeddings,
                               "use_gpu": config.use_gpu},
        batch_size=config.batch_size,
        compute=ray.data.ActorPoolStrategy(size=config.concurrency),
        num_gpus=1 if config.use_gpu else 0,
    )
    rows = dataset.take_all()
    teacher = dataclasses.asdict(config.teacher)
    if teacher["checkpoint"] is not None:
        teacher["checkpoint"] = redact_uri(teacher["checkpoint"])
    manifest = {
        "teacher": teacher,
        "image_size": config.teacher.image_size,
        "images": config.images,
        "written": sum(r["status"] == "written" for r in rows),
        "existing": sum(r["status"] == "exists" for r in rows),
        "errors": [{"path": r["path"], "error": r["status"][len("error: "):]} for r in rows if r["status"].startswith("error")],
    }
    with fsspec.open(join(config.embeddings, MANIFEST_FILE), "w") as handle:
        json.dump(manifest, handle, indent=1)
    return manifest


def read_manifest(embeddings: str) -> dict:
    try:
        with fsspec.open(join(embeddings, MANIFEST_FILE), "r") as handle:
            return json.load(handle)
    except FileNotFoundError as err:
        raise DataError(f"no {MANIFEST_FILE} under {embeddings}: run `ovsam-batch train precompute-teacher` first") from err


@click.command("precompute-teacher")
@click.option("--images", required=True, help="Folder or prefix of SA-1B-layout images (local or s3://).")
@click.option("--embeddings", required=True, help="Where to write the teacher embeddings (local or s3://).")
@click.option("--teacher", default="vit_h", show_default=True, help="vit_h, vit_l, vit_b or a teacher JSON config.")
@click.option("--sam-checkpoint", default=None, help="segment-anything checkpoint of the teacher (path, URL or hf://).")
@click.option("--image-size", default=1024, show_default=True, type=int,
              help="Input side of a vit_* teacher (= the student model's image_size); a JSON teacher sets its own.")
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(min=1),
              help="Images per teacher call.")
@click.option("--concurrency", default=1, show_default=True, type=click.IntRange(min=1), help="Teacher replicas.")
@click.option("--gpu/--cpu", "use_gpu", default=False, show_default=True, help="One GPU per teacher replica.")
@click.option("--address", default=None, help="Ray cluster address (default: local Ray).")
def main(images: str, embeddings: str, teacher: str, sam_checkpoint: str | None, image_size: int, batch_size: int,
         concurrency: int, use_gpu: bool, address: str | None) -> None:
    """Precompute SAM teacher embeddings for SAM2CLIP distillation (one .npy per image).

    --teacher is vit_h/vit_l/vit_b (with --sam-checkpoint) or, offline, a JSON file of TeacherConfig's
    fields (image_size, embed_dim, depth, num_heads, global_attn_indexes, window_size, out_channels,
    checkpoint, seed): a checkpoint-less JSON teacher is seeded-random, as the shapes recipe uses.

    \b
    Examples:
      ovsam-batch train precompute-teacher --images s3://b/sa1b/ --embeddings s3://b/sa1b-vith/ \\
          --teacher vit_h --sam-checkpoint /models/sam_vit_h_4b8939.pth --gpu --concurrency 8
      ovsam-batch train precompute-teacher --images imgs/ --embeddings emb/ --teacher teacher.json
    """
    try:
        teacher_config = TeacherConfig.from_spec(teacher, sam_checkpoint, image_size)
        manifest = precompute(PrecomputeConfig(images, embeddings, teacher_config, batch_size, concurrency, use_gpu, address))
    except (DataError, weight_io.WeightsError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"teacher embeddings: {manifest['written']} written, {manifest['existing']} already there, "
               f"{len(manifest['errors'])} errors")
    for error in manifest["errors"]:
        click.echo(f"  {error['path']}: {error['error']}", err=True)


if __name__ == "__main__":
    main()
