"""The offline `shapes` model: a small OVSAM trained on synthetic shapes with the two training jobs, on CPU.

    python -m jobs.recipes.shapes --work /tmp/shapes-recipe [--ship]

Steps (each is also a plain command; see docs in README "Training and evaluation"):

1. Data: `jobs.shapes` writes a training set (seed 1) and a held-out set (seed 2) of 256 px images.
2. Config: the `tiny` preset's dimensions at image size 256, with vocabulary
   ``circle,square,triangle,star,hexagon`` and the CLIP branch of the label fusion switched off
   (alpha = beta = 0): no pretrained CLIP exists offline, so the CLIP tower is seeded-random and its
   region embeddings carry no class information; the head's RoI classifier names the shapes.
3. SAM2CLIP: no SAM checkpoint exists offline either, so the teacher is a small seeded-random SAM ViT
   (`TEACHER`); its embeddings are precomputed once and the adapter is distilled towards them. This runs
   the real job end to end; the masks' quality then comes from step 4.
4. CLIP2SAM with ``--train-adapter --train-clip-image``: FPN, RoI conv, label token, mask decoder, adapter
   and CLIP's image tower trained on the training set's instances (box and point prompts). The image tower
   is trained because it is random: on its frozen features the RoI classifier stayed at chance (accuracy
   0.19 after an epoch), and a single batch could not even be memorised; with it trainable it can.
5. Evaluation: ``ovsam-batch label --mode box`` on the held-out set with its ground-truth boxes, then
   ``ovsam-batch eval`` (mean IoU and accuracy per class).
6. ``--ship``: store the model in float16 under ``ovsam/checkpoints/shapes/`` (the package's offline default).

Deviations from the release recipe, for a CPU and from-scratch weights: learning rate `LR` instead of 1e-4
(nothing here starts from SAM's trained decoder or a trained CLIP), `NUM_POINTS` points per mask, and two
short rounds of 4 + 3 epochs instead of one of 12 (see `RecipeConfig.clip2sam_rounds`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import subprocess
import sys
import time

import click
import torch

import ovsam
from jobs import clip2sam, common, sam2clip, shapes, teacher

IMAGE_SIZE = 256
TRAIN_SEED, HELD_OUT_SEED = 1, 2
VOCABULARY = ",".join(shapes.SHAPE_CLASSES)
# A SAM-style ViT small enough for a CPU, seeded-random (see step 3).
TEACHER = teacher.TeacherConfig(image_size=IMAGE_SIZE, embed_dim=64, depth=2, num_heads=4, global_attn_indexes=(1,),
                                window_size=8, out_channels=128, seed=0)
LR = 1e-3
NUM_POINTS = 4096
SHIP_DIR = pathlib.Path(ovsam.config.CHECKPOINT_DIR) / "shapes"
DESCRIPTION = (
    "Offline demo model: trained on synthetic shapes (circle, square, triangle, star, hexagon) by "
    "jobs/recipes/shapes.py. Random-weight CLIP tower; names only those five shapes."
)


@dataclasses.dataclass(frozen=True)
class RecipeConfig:
    work: str
    train_images: int = 2000
    held_out_images: int = 200
    distill_images: int = 200
    distill_epochs: int = 2
    # CLIP2SAM epochs (of 250 steps) per round; each round restarts the learning-rate schedule from the
    # previous round's model. The shipped model: 4 epochs, then 3 more when its masks were still improving
    # (the release trains 12 epochs in one round; these 7 took 33 minutes on a shared 2-core machine).
    clip2sam_rounds: tuple[int, ...] = (4, 3)
    batch_size: int = 8
    num_workers: int = 1
    cpus_per_worker: int = 2
    ship: bool = False


def shapes_config() -> dict:
    config, _ = ovsam.load_config("tiny")
    config = dataclasses.replace(
        config, name="shapes", image_size=IMAGE_SIZE, vocabulary=VOCABULARY, trained=False, description=DESCRIPTION,
        fusion=dataclasses.replace(config.fusion, alpha=0.0, beta=0.0),
    )
    return config.to_dict()


def run_recipe(config: RecipeConfig) -> dict:
    work = pathlib.Path(config.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    timings = {}
    start = time.perf_counter()
    train = shapes.generate(shapes.ShapesConfig(str(work / "train"), config.train_images, TRAIN_SEED, IMAGE_SIZE))
    held_out = shapes.generate(shapes.ShapesConfig(str(work / "held_out"), config.held_out_images, HELD_OUT_SEED, IMAGE_SIZE))
    (work / "shapes_preset.json").write_text(json.dumps(shapes_config(), indent=1))
    (work / "teacher.json").write_text(json.dumps(dataclasses.asdict(TEACHER)))
    timings["data_s"] = time.perf_counter() - start

    def settings(name: str, epochs: int, export: pathlib.Path) -> common.RunSettings:
        return common.RunSettings(storage=str(work / "runs"), name=name, epochs=epochs, batch_size=config.batch_size,
                                  lr=LR, num_workers=config.num_workers, cpus_per_worker=config.cpus_per_worker,
                                  export=str(export))

    start = time.perf_counter()
    distill_dir = work / "distill_images"
    distill_dir.mkdir(exist_ok=True)
    for path in sorted((work / "train" / "images").iterdir())[: config.distill_images]:
        shutil.copy2(path, distill_dir / path.name)
    teacher.precompute(teacher.PrecomputeConfig(str(distill_dir), str(work / "teacher_embeddings"), TEACHER,
                                                batch_size=config.batch_size))
    timings["precompute_teacher_s"] = time.perf_counter() - start

    start = time.perf_counter()
    sam2clip.run(sam2clip.Sam2ClipJob(str(work / "shapes_preset.json"), str(distill_dir), str(work / "teacher_embeddings")),
                 settings("sam2clip", config.distill_epochs, work / "after_sam2clip"))
    timings["sam2clip_s"] = time.perf_counter() - start

    start = time.perf_counter()
    model_dir = work / "after_sam2clip"
    for round_index, epochs in enumerate(config.clip2sam_rounds):
        job = clip2sam.Clip2SamJob(str(model_dir), str(train), str(work / "train" / "images"), num_points=NUM_POINTS,
                                   train_adapter=True, train_clip_image=True)
        model_dir = work / f"model_round{round_index}"
        result = clip2sam.run(job, settings(f"clip2sam_round{round_index}", epochs, model_dir))
    timings["clip2sam_s"] = time.perf_counter() - start
    if config.ship:
        shutil.rmtree(SHIP_DIR, ignore_errors=True)
        ovsam.save_model(ovsam.load_model(model_dir, device="cpu"), SHIP_DIR, dtype=torch.float16)
        model_dir = SHIP_DIR

    import ray

    ray.shutdown()
    labels = work / "held_out_labels"
    shutil.rmtree(labels, ignore_errors=True)
    start = time.perf_counter()
    cli = [sys.executable, "-c", "from ovsam_batch.cli import main; main()"]
    subprocess.run([*cli, "label", str(work / "held_out" / "images"), "--output", str(labels), "--mode", "box",
                    "--prompts", str(held_out), "--preset", str(model_dir)], check=True)
    timings["label_held_out_s"] = time.perf_counter() - start
    subprocess.run([*cli, "eval", str(labels), "--gt", str(held_out)], check=True)
    report = json.loads((labels / "eval.json").read_text())
    summary = {"timings_s": {k: round(v, 1) for k, v in timings.items()}, "final_train_metrics": result.metrics,
               "held_out": report["overall"], "model_dir": str(model_dir)}
    (work / "recipe_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


@click.command()
@click.option("--work", required=True, type=click.Path(file_okay=False), help="Working folder (data, runs, outputs).")
@click.option("--train-images", default=RecipeConfig.train_images, show_default=True)
@click.option("--held-out-images", default=RecipeConfig.held_out_images, show_default=True)
@click.option("--epochs", "clip2sam_rounds", default=RecipeConfig.clip2sam_rounds, multiple=True, type=int,
              show_default=True, help="CLIP2SAM epochs per round (repeat the option for several rounds).")
@click.option("--ship", is_flag=True, help="Store the result in float16 under ovsam/checkpoints/shapes/.")
def main(work: str, train_images: int, held_out_images: int, clip2sam_rounds: tuple[int, ...], ship: bool) -> None:
    """Train, evaluate (and optionally ship) the offline shapes model."""
    summary = run_recipe(RecipeConfig(work=work, train_images=train_images, held_out_images=held_out_images,
                                      clip2sam_rounds=clip2sam_rounds, ship=ship))
    click.echo(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
