"""Region-text pre-training of the shapes model's small CLIP tower (step 3 of `jobs.recipes.shapes`).

OVSAM starts from a CLIP trained on web image-text pairs; offline there is none, and a seeded-random CLIP
cannot name anything: its text embeddings of the five shape names are nearly parallel (cosine 0.70-0.97)
and its maps carry no shape information, so neither CLIP2SAM's RoI classifier (the mean of per-location
features over a box) nor the CLIP branch of the label fusion can separate the classes. This step gives the
tower what web pre-training gives the real one, on the domain at hand: both of CLIP's towers are trained
so that image regions are closest to the prototype of their class name, the mean over the 14 ViLD
templates the labeller embeds vocabularies with (`ovsam.vocabulary.template_prompts`). Two losses, both
CLIP2SAM's cross-entropy over the classes plus background on the labeller's cosine logits (`classify`):

* region: the region embedding of every ground-truth box (`CLIPTower.region_embeddings`, exactly the path
  the labeller's CLIP branch uses);
* dense: every stride-8 cell of the image, from CLIP's maps 2-4 through a 1x1 projection to the embedding
  space (a pre-training head, not kept), background where no shape is. It makes every location of the
  maps know which shape it lies on, which is what the FPN and the RoI classifier need; the region loss
  alone learns slowly because a small shape covers less than one stride-32 cell.

It runs on Ray Train like the two jobs (checkpoint per epoch, resume), through `jobs.common`.
"""

from __future__ import annotations

import dataclasses

import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F
from torch import nn

import ovsam
from jobs import common, losses
from jobs.data import CocoInstances, coco_categories, collate_instances, load_coco
from ovsam.clip2sam import classify, logit_scale
from ovsam.vocabulary import prototypes_from_text, template_prompts


@dataclasses.dataclass(frozen=True)
class RegionClipJob:
    """``model``: preset JSON or model directory whose CLIP tower is trained; ``annotations`` / ``images``:
    COCO instances and their image folder; the category names (id order) are the captions' class names."""

    model: str
    annotations: str
    images: str
    max_instances: int = 40


# Stride of the maps the dense loss reads (CLIP's layer2); deeper maps are upsampled to it.
DENSE_STRIDE = 8


class _Step(nn.Module):
    """Region and dense logits of a collated batch (see `collate_instances`), with the dense targets."""

    def __init__(self, clip: ovsam.clip_tower.CLIPTower, vocabulary: ovsam.Vocabulary) -> None:
        super().__init__()
        self.clip = clip
        self.vocabulary = vocabulary
        self.dense_head = nn.Conv2d(sum(clip.channels[1:]), clip.embed_dim, 1)
        self.register_buffer("tokens", clip.tokenize(template_prompts(vocabulary)), persistent=False)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        maps = self.clip.features(batch["pixels"])
        prototypes = prototypes_from_text(self.clip.encode_text(self.tokens), self.vocabulary)
        image_index = batch["image_index"]
        rois = torch.cat([image_index[:, None].float(), batch["boxes"]], dim=1)
        region_logits = self._logits(self.clip.region_embeddings(maps[-1], rois, mask_logits=None), prototypes)

        size = maps[1].shape[-2:]
        dense = torch.cat([maps[1], *(F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps[2:])], 1)
        dense = self.dense_head(dense).permute(0, 2, 3, 1).flatten(0, 2)
        dense_logits = self._logits(dense, prototypes)
        # Cell labels: the shape covering most of the cell (visible masks are disjoint), else background.
        cover = F.avg_pool2d(batch["masks"][:, None].float(), DENSE_STRIDE)[:, 0]
        background = len(self.vocabulary)
        targets = torch.full((len(batch["pixels"]), *size), background, dtype=torch.int64, device=cover.device)
        inside = cover > 0.5
        owners = image_index[:, None, None].expand_as(cover)[inside]
        targets.index_put_((owners, *inside.nonzero(as_tuple=True)[1:]), batch["labels"][:, None, None].expand_as(cover)[inside])
        return {"region_logits": region_logits, "dense_logits": dense_logits, "dense_targets": targets.flatten()}

    def _logits(self, embeddings: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """`classify` at CLIP's own learnt temperature (initialised at 1/0.07), as CLIP pre-training does; the
        labeller's fixed 100 rescales the logits without changing their order."""
        return classify(embeddings, prototypes) * (self.clip.model.logit_scale.exp() / logit_scale())


def train_loop(loop_config: dict) -> None:
    """Per-worker loop (Ray Train)."""
    job: RegionClipJob = loop_config["job"]
    settings: common.RunSettings = loop_config["settings"]
    device, model, state = common.start_worker(job.model, settings, "shapes_clip")
    vocabulary = ovsam.Vocabulary.from_spec(loop_config["vocabulary_spec"])
    step = _Step(model.clip, vocabulary)
    params = common.train_only(model, [model.clip.model]) + list(step.dense_head.parameters())
    step = ray.train.torch.prepare_model(step)
    optimiser, scheduler = common.make_optimiser(params, settings)
    start_epoch = common.restore_optimiser(state, optimiser, scheduler)

    dataset = CocoInstances(loop_config["coco"], job.images, model.config.image_size, job.max_instances, settings.seed)
    sampler, loader = common.worker_loader(dataset, settings, num_workers=1, collate_fn=collate_instances)
    for epoch in range(start_epoch, settings.epochs):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        sums = torch.zeros(6)  # loss, region loss, region accuracy, steps; correct and all shape cells
        for steps, batch in enumerate(loader, start=1):
            batch = {key: value.to(device) for key, value in batch.items()}
            out = step(batch)
            region_loss = losses.classification_loss(out["region_logits"], batch["labels"])
            loss = region_loss + losses.classification_loss(out["dense_logits"], out["dense_targets"])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            correct = (out["region_logits"][:, :-1].argmax(1) == batch["labels"]).float().mean()
            on_shapes = out["dense_targets"] < len(vocabulary)
            cells_correct = (out["dense_logits"][on_shapes].argmax(1) == out["dense_targets"][on_shapes]).sum()
            sums += torch.tensor([loss.item(), region_loss.item(), correct.item(), 1.0, cells_correct.item(),
                                  on_shapes.sum().item()])
            if settings.max_steps is not None and steps >= settings.max_steps:
                break
        lr = common.finish_epoch(sums, optimiser, scheduler)
        mean = sums[:3] / sums[3].clamp(min=1)
        metrics = {"epoch": epoch, "loss": float(mean[0]), "region_loss": float(mean[1]),
                   "region_accuracy": float(mean[2]), "shape_cell_accuracy": float(sums[4] / sums[5].clamp(min=1)),
                   "steps": int(sums[3]), "lr": lr}
        common.report_epoch(metrics, model, optimiser, scheduler, epoch + 1)


def run(job: RegionClipJob, settings: common.RunSettings) -> ray.train.Result:
    coco = load_coco(job.annotations)
    spec = ",".join(coco_categories(coco).names)
    return common.run(train_loop, {"job": job, "settings": settings, "coco": coco, "vocabulary_spec": spec}, settings)
