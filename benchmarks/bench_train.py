"""Training-step throughput of the two jobs' per-worker step, on one process (no Ray), for the report.

    python benchmarks/bench_train.py --preset tiny --image-size 256 --batch-size 8 --steps 10

Prints seconds per step and images/s for a CLIP2SAM step (forward + backward + AdamW, box/point prompts on
synthetic shapes, adapter trained as in the shapes recipe) and a SAM2CLIP step (MSE to a fixed target).
The first two steps are warm-up and not timed.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time

import click
import torch

import ovsam
from jobs import clip2sam, data, losses, shapes

WARMUP_STEPS = 2


def _timed(step, steps: int) -> float:
    for _ in range(WARMUP_STEPS):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


@click.command()
@click.option("--preset", default="tiny", show_default=True)
@click.option("--image-size", default=256, show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--steps", default=10, show_default=True)
@click.option("--threads", default=torch.get_num_threads(), show_default=True)
def main(preset: str, image_size: int, batch_size: int, steps: int, threads: int) -> None:
    torch.set_num_threads(threads)
    config, _ = ovsam.load_config(preset)
    model = ovsam.build_model(dataclasses.replace(config, image_size=image_size)).train()
    with tempfile.TemporaryDirectory() as work:
        annotations = shapes.generate(shapes.ShapesConfig(work, num_images=batch_size, seed=0, size=image_size))
        coco = data.load_coco(str(annotations))
        dataset = data.CocoInstances(coco, f"{work}/images", image_size, clip2sam.DEFAULT_MAX_INSTANCES, seed=0)
        batch = data.collate_instances([dataset[i] for i in range(batch_size)])
    vocabulary = ovsam.Vocabulary.from_spec(",".join(shapes.SHAPE_CLASSES))
    class_embeddings = ovsam.embed_vocabulary(vocabulary, model.clip.encode_text, model.clip.tokenize,
                                              text_tower_fingerprint=model.text_fingerprint())
    job = clip2sam.Clip2SamJob(preset, "", "", num_points=losses.NUM_POINTS, train_adapter=True)
    step_module = clip2sam._Step(model, class_embeddings, job)
    trained = [model.fpn, model.head.mask_decoder, model.head.label_token, model.head.roi_conv, model.sam2clip]
    optimiser = torch.optim.AdamW([p for m in trained for p in m.parameters()], lr=1e-4)

    def clip2sam_step() -> None:
        loss = clip2sam.total_loss(step_module(batch))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    target = torch.randn(batch_size, config.decoder.dim, image_size // 16, image_size // 16)

    def sam2clip_step() -> None:
        with torch.no_grad():
            maps = model.clip.features(batch["pixels"])
        loss = torch.nn.functional.mse_loss(model.sam2clip(maps), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    figures = {"preset": preset, "image_size": image_size, "batch_size": batch_size, "threads": threads,
               "instances_per_batch": int(len(batch["labels"]))}
    for name, step in (("clip2sam", clip2sam_step), ("sam2clip", sam2clip_step)):
        seconds = _timed(step, steps)
        figures[f"{name}_s_per_step"] = round(seconds, 3)
        figures[f"{name}_images_per_s"] = round(batch_size / seconds, 2)
    click.echo(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
