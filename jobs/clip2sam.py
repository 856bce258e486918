"""CLIP2SAM on Ray Train: the FPN, RoI conv, label token and mask decoder learn to segment and name
objects from box and point prompts on COCO-format instance annotations (COCO, LVIS or a user's own).

    ovsam-batch train clip2sam --preset coco_rn50x16 --annotations instances_train.json --images train2017/ \
        --storage s3://b/runs --name c2s --num-workers 8 --gpu
    ray job submit -- python -m jobs.clip2sam ...   # the same options

The release's recipe (its ``use_point_det`` preprocessor with 40 proposals): per image ``max_instances``
prompts, the instances repeated until there are that many, half prompted by the ground-truth box and half
by a random point of the mask; losses 2 x cross-entropy over the classes + background, 5 x mask BCE and
5 x dice on points sampled where the mask is uncertain; recognition is trained on RoIs of the ground-truth
boxes. CLIP, the SAM2CLIP adapter and the prompt encoder stay frozen
(``train_adapter`` also trains the adapter, for a model whose adapter was never distilled from a useful
teacher). The class embeddings come from the dataset's category names (or ``vocabulary``) through the
model's CLIP text tower. Checkpoints are model directories; ``clip2sam.safetensors`` holds ``fpn_neck.*``
and ``mask_decoder.*``. Where this differs from the release: an image with more than ``max_instances``
instances gets a random subset each epoch (the release takes the first ones), and the mask decoder starts
from the model given (the release initialises it from SAM ViT-H's decoder; give such a model as
``--preset``).

Beyond the release, ``background_points`` (``--background-points R``) adds R background prompts per object
prompt: points on no object (half of them just outside an object's border, see
`jobs.data.BORDER_BAND_PIXELS`), whose targets are the background class and an empty mask. They go through
the same three losses: the cross-entropy teaches the head's classifier "no object" (their class term has
weight 1, not the release's no-object weight 0.1: see `jobs.losses.BACKGROUND_PROMPT_WEIGHT`), the BCE
and dice against an all-zero mask teach the decoder to return nothing there.
Their RoI is the box of the mask the model predicts for them (detached), which is what the labeller
classifies at inference; an empty prediction gives an empty RoI, as at inference. The release trains on
object prompts only, so its background class is never a target and automatic mode cannot reject a grid
point on background; the default stays the release's (0).

Batches whose prompts all vanish at the model's input size (instances smaller than a pixel there) are
skipped and counted (``skipped_batches``): their losses would be NaN and AdamW would write NaN weights.
"""

from __future__ import annotations

import dataclasses

import click
import ray.train
import ray.train.torch
import torch
from torch import nn

import ovsam
from jobs import common, losses
from jobs.data import CocoInstances, DataError, coco_categories, collate_instances, load_coco
from ovsam.clip2sam import classify
from ovsam.vocabulary import split_synonyms

# The release's preprocessor keeps at most 40 prompts per image.
DEFAULT_MAX_INSTANCES = 40


@dataclasses.dataclass(frozen=True)
class Clip2SamJob:
    """``model``: preset, preset JSON or model directory to start from; ``annotations``: COCO instances
    JSON; ``images``: folder its file_names are relative to; ``vocabulary``: spec of the class names to
    embed (None = the dataset's category names, in category-id order)."""

    model: str
    annotations: str
    images: str
    vocabulary: str | None = None
    max_instances: int = DEFAULT_MAX_INSTANCES
    num_points: int = losses.NUM_POINTS
    train_adapter: bool = False
    train_clip_image: bool = False
    loader_workers: int = 1
    background_points: float = 0.0

    def __post_init__(self) -> None:
        if self.max_instances < 1 or self.num_points < 1:
            raise common.JobError("max_instances and num_points must be at least 1")
        if self.background_points < 0:
            raise common.JobError(f"background_points must be at least 0, got {self.background_points}")


def training_vocabulary(job: Clip2SamJob, category_names: tuple[str, ...]) -> tuple[str, list[int]]:
    """The vocabulary spec, and for each dataset class (category-id order) its index in that vocabulary."""
    if job.vocabulary is None:
        if bad := [n for n in category_names if "," in n]:
            raise common.JobError(f"category names {bad[:5]} contain commas; give the class list with --vocabulary FILE")
        spec = ",".join(category_names)
    else:
        spec = job.vocabulary
    vocabulary = ovsam.Vocabulary.from_spec(spec)
    index_of = {name: k for k, name in enumerate(vocabulary.names)}
    mapping = [index_of.get((split_synonyms(name) or [name])[0]) for name in category_names]
    if missing := [n for n, k in zip(category_names, mapping) if k is None]:
        raise common.JobError(f"categories {missing[:8]} are not in vocabulary {spec!r}")
    return spec, mapping


class _Step(nn.Module):
    """One training step's forward: losses for a collated batch (see `collate_instances`)."""

    def __init__(self, model: ovsam.OVSAM, class_embeddings: torch.Tensor, job: Clip2SamJob) -> None:
        super().__init__()
        self.clip, self.sam2clip, self.fpn = model.clip, model.sam2clip, model.fpn
        self.prompt_encoder, self.head = model.prompt_encoder, model.head
        self.image_size = model.config.image_size
        self.train_adapter = job.train_adapter
        self.train_clip_image = job.train_clip_image
        self.num_points = job.num_points
        self.register_buffer("class_embeddings", class_embeddings, persistent=False)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.set_grad_enabled(self.train_clip_image):
            maps = self.clip.features(batch["pixels"])
        with torch.set_grad_enabled(self.train_adapter or self.train_clip_image):
            embedding = self.sam2clip(maps)
        fpn_maps = self.fpn(maps)
        # The frozen prompt encoder in float32 also under autocast, as at inference (`OVSAM.float32`).
        with torch.no_grad(), torch.autocast(batch["boxes"].device.type, enabled=False):
            # Both prompt kinds give two tokens (a point is padded with SAM's "not a point" token).
            box_sparse, dense = self.prompt_encoder(points=None, boxes=batch["boxes"], masks=None)
            ones = torch.ones(len(batch["points"]), 1, dtype=torch.int64, device=batch["points"].device)
            point_sparse, _ = self.prompt_encoder(points=(batch["points"][:, None], ones), boxes=None, masks=None)
            sparse = torch.where(batch["is_box"][:, None, None], box_sparse, point_sparse)
            image_pe = self.prompt_encoder.get_dense_pe()
        image_index = batch["image_index"]
        out = self.head(embedding, image_pe, sparse, dense, image_index, fpn_maps, self.image_size)
        # Object prompts: the ground-truth box (the release); background prompts: the predicted mask's box.
        boxes = torch.where(batch["is_background"][:, None], out.mask_boxes.detach(), batch["boxes"])
        rois = torch.cat([image_index[:, None].float(), boxes], dim=1)
        roi_embeddings = self.head.roi_conv(self.head.roi_extractor(fpn_maps, rois)).mean(-1).mean(-1)
        logits = classify(roi_embeddings, self.class_embeddings)
        bce, dice = losses.mask_losses(out.low_res_masks, batch["masks"][:, None], self.num_points)
        on_object = ~batch["is_background"]
        background = batch["is_background"]
        loss_cls = losses.classification_loss(logits, batch["labels"], losses.BACKGROUND_PROMPT_WEIGHT)
        return {"loss_cls": loss_cls, "loss_mask": bce, "loss_dice": dice,
                "accuracy": (logits[on_object, :-1].argmax(1) == batch["labels"][on_object]).float().mean(),
                # Share of background prompts the head calls background (nan-free: 0 when there are none).
                "background_recall": (logits[background].argmax(1) == logits.shape[1] - 1).float().sum()
                / background.sum().clamp(min=1)}


def total_loss(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    return (losses.CLS_WEIGHT * parts["loss_cls"] + losses.MASK_WEIGHT * parts["loss_mask"]
            + losses.DICE_WEIGHT * parts["loss_dice"])


def train_loop(loop_config: dict) -> None:
    """Per-worker loop (Ray Train)."""
    job: Clip2SamJob = loop_config["job"]
    settings: common.RunSettings = loop_config["settings"]
    device, model, state = common.start_worker(job.model, settings, "clip2sam")
    model.config = dataclasses.replace(model.config, trained=True, vocabulary=loop_config["vocabulary_spec"],
                                       seen_classes=loop_config["seen_classes"])
    trained_modules = [model.fpn, model.head.mask_decoder, model.head.label_token, model.head.roi_conv]
    if job.train_adapter:
        trained_modules.append(model.sam2clip)
    if job.train_clip_image:
        trained_modules.append(model.clip.model.visual)
    params = common.train_only(model, trained_modules)
    # The prompt encoder stays as SAM made it; the label MLP is not part of the released forward (its output is
    # multiplied by zero there), so it stays frozen too.
    vocabulary = ovsam.Vocabulary.from_spec(loop_config["vocabulary_spec"])
    class_embeddings = ovsam.embed_vocabulary(vocabulary, model.clip.encode_text, model.clip.tokenize,
                                              text_tower_fingerprint=model.text_fingerprint())
    class_embeddings = class_embeddings[loop_config["class_to_vocabulary"]]
    # RoIs go to the FPN level of their size, so a batch may leave some levels without a gradient.
    step = ray.train.torch.prepare_model(_Step(model, class_embeddings, job),
                                         parallel_strategy_kwargs={"find_unused_parameters": True})
    optimiser, scheduler = common.make_optimiser(params, settings)
    start_epoch = common.restore_optimiser(state, optimiser, scheduler)

    dataset = CocoInstances(loop_config["coco"], job.images, model.config.image_size, job.max_instances, settings.seed,
                            replicate=True, background_points=job.background_points)
    sampler, loader = common.worker_loader(dataset, settings, job.loader_workers, collate_fn=collate_instances)
    names = ("loss", "loss_cls", "loss_mask", "loss_dice", "accuracy", "background_recall")
    for epoch in range(start_epoch, settings.epochs):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        sums, steps, skipped_batches = torch.zeros(len(names) + 1), 0, 0
        for steps, batch in enumerate(loader, start=1):
            if not (~batch["is_background"]).any():
                skipped_batches += 1
                continue
            with common.autocast(device):
                parts = step({key: value.to(device) for key, value in batch.items()})
            loss = total_loss(parts)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            sums += torch.tensor([loss.item(), *(parts[n].item() for n in names[1:]), 1.0])
            if settings.max_steps is not None and steps >= settings.max_steps:
                break
        lr = common.finish_epoch(sums, optimiser, scheduler)
        metrics = {"epoch": epoch, "started_at_epoch": start_epoch, **{n: float(sums[i] / sums[-1].clamp(min=1)) for i, n in enumerate(names)},
                   "steps": int(sums[-1]), "skipped_batches": skipped_batches, "lr": lr}
        common.report_epoch(metrics, model, optimiser, scheduler, epoch + 1)


def run(job: Clip2SamJob, settings: common.RunSettings) -> ray.train.Result:
    """Train CLIP2SAM; reads and checks the annotations and the vocabulary before any worker starts."""
    coco = load_coco(job.annotations)
    spec, mapping = training_vocabulary(job, coco_categories(coco).names)
    # The head learns exactly the dataset's classes: what the exported config records as seen.
    class_strings = ovsam.Vocabulary.from_spec(spec).class_strings
    loop_config = {"job": job, "settings": settings, "coco": coco, "vocabulary_spec": spec,
                   "class_to_vocabulary": mapping, "seen_classes": tuple(class_strings[k] for k in mapping)}
    return common.run(train_loop, loop_config, settings)


@click.command("clip2sam")
@click.option("--preset", "model_spec", required=True, help="Model to start from: preset name, preset JSON or model directory.")
@click.option("--annotations", required=True, help="COCO instances JSON (local or s3://).")
@click.option("--images", required=True, help="Folder the annotations' file_names are relative to (local or s3://).")
@click.option("--vocabulary", default=None, help="Class names to embed (coco, lvis, file, comma list); default: the dataset's categories.")
@click.option("--max-instances", default=DEFAULT_MAX_INSTANCES, show_default=True, type=click.IntRange(min=1),
              help="Object prompts per image and step: its instances in random order, repeated up to this many (the release: 40).")
@click.option("--num-points", default=losses.NUM_POINTS, show_default=True, type=click.IntRange(min=1),
              help="Points per mask for the mask losses.")
@click.option("--train-adapter", is_flag=True, help="Also train the SAM2CLIP adapter (frozen in the release).")
@click.option("--train-clip-image", is_flag=True,
              help="Also train CLIP's image tower (frozen in the release; for a tower without pretrained weights).")
@click.option("--loader-workers", default=1, show_default=True, type=click.IntRange(min=0),
              help="Data-loading processes per Ray worker.")
@click.option("--background-points", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="Background prompts per object prompt: points on no object (half near borders), trained towards "
                   "the background class and an empty mask. Beyond the release (0), which never trains background.")
@common.run_options
def main(model_spec: str, annotations: str, images: str, vocabulary: str | None, max_instances: int, num_points: int,
         train_adapter: bool, train_clip_image: bool, loader_workers: int, background_points: float,
         settings: common.RunSettings) -> None:
    """Train the CLIP2SAM stage (FPN + OVSAM head) on COCO-format instances (Ray Train).

    \b
    Example:
      ovsam-batch train clip2sam --preset models/s2c --annotations instances_train2017.json \\
          --images train2017/ --storage s3://b/runs --name c2s --num-workers 8 --gpu --export models/c2s
    """
    try:
        job = Clip2SamJob(model_spec, annotations, images, vocabulary, max_instances, num_points, train_adapter,
                          train_clip_image, loader_workers, background_points)
        result = run(job, settings)
    except (DataError, common.JobError, ovsam.OVSAMError) as err:
        raise click.ClickException(str(err)) from err
    common.echo_result(result, settings)


if __name__ == "__main__":
    main()
