"""SAM2CLIP distillation on Ray Train: the adapter learns to turn frozen CLIP features into SAM's image
embedding (MSE against precomputed teacher embeddings, as the release does).

    ovsam-batch train precompute-teacher --images DIR --embeddings EMB --teacher vit_h --sam-checkpoint sam_vit_h.pth
    ovsam-batch train sam2clip --preset coco_rn50x16 --images DIR --embeddings EMB --storage s3://b/runs --name s2c
    ray job submit -- python -m jobs.sam2clip ...   # the same options

Each worker reads its shard of the embedded images, trains only the adapter (CLIP frozen), and every epoch
reports the mean loss over all workers with a checkpoint (a model directory: `sam2clip.safetensors` holds
``neck_student.*``, the release's layout) from which a restarted worker group resumes.
"""

from __future__ import annotations

import dataclasses

import click
import fsspec
import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F
from torch import nn

import ovsam
from jobs import common
from jobs.data import EMBEDDING_SUFFIX, DataError, DistillationPairs
from jobs.teacher import read_manifest


@dataclasses.dataclass(frozen=True)
class Sam2ClipJob:
    """``model``: preset, preset JSON or model directory to start from; ``images``: SA-1B-layout folder;
    ``embeddings``: the teacher embeddings written by precompute-teacher for those images."""

    model: str
    images: str
    embeddings: str
    loader_workers: int = 1


class _Student(nn.Module):
    """Frozen CLIP tower + trainable adapter: [B, 3, S, S] input -> [B, 256, S/16, S/16] embedding."""

    def __init__(self, model: ovsam.OVSAM) -> None:
        super().__init__()
        self.clip = model.clip
        self.sam2clip = model.sam2clip

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            maps = self.clip.features(pixels)
        return self.sam2clip(maps)


def embedded_images(embeddings: str) -> list[str]:
    """Relative image paths that have a teacher embedding (``<image path>.npy`` under ``embeddings``)."""
    fs, root = fsspec.core.url_to_fs(embeddings)
    root = root.rstrip("/")
    paths = sorted(p[len(root) + 1: -len(EMBEDDING_SUFFIX)] for p in fs.find(root) if p.endswith(EMBEDDING_SUFFIX))
    if not paths:
        raise DataError(f"no teacher embeddings under {embeddings}: run `ovsam-batch train precompute-teacher` first")
    return paths


def train_loop(loop_config: dict) -> None:
    """Per-worker loop (Ray Train)."""
    job: Sam2ClipJob = loop_config["job"]
    settings: common.RunSettings = loop_config["settings"]
    device, model, state = common.start_worker(job.model, settings, "sam2clip")
    params = common.train_only(model, [model.sam2clip])
    student = ray.train.torch.prepare_model(_Student(model))
    optimiser, scheduler = common.make_optimiser(params, settings)
    start_epoch = common.restore_optimiser(state, optimiser, scheduler)

    dataset = DistillationPairs(job.images, job.embeddings, loop_config["paths"], model.config.image_size)
    sampler, loader = common.worker_loader(dataset, settings, job.loader_workers)
    for epoch in range(start_epoch, settings.epochs):
        sampler.set_epoch(epoch)
        total, steps = torch.zeros(2), 0
        for steps, batch in enumerate(loader, start=1):
            with common.autocast(device):
                prediction = student(batch["pixels"].to(device))
            loss = F.mse_loss(prediction.float(), batch["target"].to(device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += torch.tensor([loss.item() * len(batch["pixels"]), len(batch["pixels"])])
            if settings.max_steps is not None and steps >= settings.max_steps:
                break
        lr = common.finish_epoch(total, optimiser, scheduler)
        metrics = {"epoch": epoch, "started_at_epoch": start_epoch, "loss": float(total[0] / total[1].clamp(min=1)), "images": int(total[1]),
                   "lr": lr}
        common.report_epoch(metrics, model, optimiser, scheduler, epoch + 1)


def run(job: Sam2ClipJob, settings: common.RunSettings) -> ray.train.Result:
    """Train SAM2CLIP; checks the data and the teacher/student grid match before any worker starts."""
    paths = embedded_images(job.embeddings)
    manifest = read_manifest(job.embeddings)
    config, _ = ovsam.load_config(job.model)
    if manifest["image_size"] != config.image_size:
        raise DataError(f"teacher embeddings were made at image size {manifest['image_size']} but model "
                        f"{job.model} takes {config.image_size}: their grids differ")
    if manifest["teacher"]["out_channels"] != config.decoder.dim:
        raise DataError(f"teacher embeddings have {manifest['teacher']['out_channels']} channels but model "
                        f"{job.model}'s image embedding has {config.decoder.dim}")
    return common.run(train_loop, {"job": job, "settings": settings, "paths": paths}, settings)


@click.command("sam2clip")
@click.option("--preset", "model_spec", required=True, help="Model to start from: preset name, preset JSON or model directory.")
@click.option("--images", required=True, help="SA-1B-layout image folder or prefix (local or s3://).")
@click.option("--embeddings", required=True, help="Teacher embeddings written by `train precompute-teacher`.")
@click.option("--loader-workers", default=1, show_default=True, type=click.IntRange(min=0),
              help="Data-loading processes per Ray worker.")
@common.run_options
def main(model_spec: str, images: str, embeddings: str, loader_workers: int, settings: common.RunSettings) -> None:
    """Distil SAM's image embeddings into the SAM2CLIP adapter (Ray Train).

    \b
    Example:
      ovsam-batch train sam2clip --preset coco_rn50x16 --images s3://b/sa1b/ --embeddings s3://b/sa1b-vith/ \\
          --storage s3://b/runs --name s2c --num-workers 8 --gpu --export models/s2c
    """
    try:
        result = run(Sam2ClipJob(model_spec, images, embeddings, loader_workers), settings)
    except (DataError, common.JobError, ovsam.OVSAMError) as err:
        raise click.ClickException(str(err)) from err
    common.echo_result(result, settings)


if __name__ == "__main__":
    main()
