"""Pipeline overhead: images/s of the Ray Data labelling pipeline against a bare Python loop running the same
model on the same images on the same machine, plus peak memory (RSS) of both.

    python benchmarks/bench_pipeline.py --num-images 24 --mode box
    python benchmarks/bench_pipeline.py --num-images 12 --mode auto --points-per-side 8

Images are synthetic shapes (`jobs.shapes`); box mode uses their ground-truth boxes as prompts.

* bare loop: read file → `decode_image` → predictor (box mode: `set_image` + `predict`; auto: `generate`), one
  image after another, model already loaded; run before and after the pipeline (ratios use the mean).
  No RLE, no Parquet: the pipeline's extra work counts as overhead.
* pipeline: `run_label` on a local Ray started beforehand. After a warm-up run of one batch (Ray starts
  its worker processes), two runs into fresh outputs, on the first half (``--limit``) and on all images:
  *end to end* = all images / wall time of the full run (includes actor start and model load);
  *steady state* = extra images / extra time between the two runs (start-up cancels).
* memory: peak of (this process + every process it started, i.e. the local Ray: GCS, raylet, workers),
  sampled every 0.2 s, for the half and the full run (bounded memory: the same peak for twice the images);
  for the bare loop, this process alone.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from pathlib import Path

import click
import numpy as np
import psutil

SAMPLE_INTERVAL_S = 0.2


class PeakRss:
    """Samples the summed RSS of this process and its descendants in a thread; ``peak`` in bytes."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    total += process.memory_info().rss
                except psutil.Error:
                    pass  # exited between listing and reading
            self.peak = max(self.peak, total)
            time.sleep(SAMPLE_INTERVAL_S)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def bare_loop(paths: list[Path], boxes: dict[str, np.ndarray], preset: str, mode: str,
              points_per_side: int, threads: int) -> tuple[float, float, int]:
    """Images/s of decode + predict over ``paths`` with ``threads`` torch threads; also model load seconds and
    peak RSS (bytes)."""
    import torch

    import ovsam
    from ovsam.images import decode_image

    torch.set_num_threads(threads)
    with PeakRss() as memory:
        started = time.perf_counter()
        model = ovsam.load_model(preset)
        predictor = ovsam.Predictor(model)
        labeller = ovsam.AutomaticLabeller(predictor, ovsam.AutomaticConfig(points_per_side=points_per_side))
        load_s = time.perf_counter() - started
        started = time.perf_counter()
        for path in paths:
            rgb = decode_image(path.read_bytes())
            if mode == "box":
                predictor.set_image(rgb)
                predictor.predict(boxes=boxes[path.name])
            else:
                labeller.generate(rgb)
        seconds = time.perf_counter() - started
    return len(paths) / seconds, load_s, memory.peak


def pipeline_run(images: Path, prompts: Path, output: Path, preset: str, mode: str, points_per_side: int,
                 batch_size: int, limit: int | None) -> float:
    import ovsam
    from pipelines.config import LabelConfig
    from pipelines.label import run_label

    config = LabelConfig(input=str(images), output=str(output), mode=mode, prompts=str(prompts) if mode == "box"
                         else None, preset=preset, batch_size=batch_size, limit=limit,
                         automatic=ovsam.AutomaticConfig(points_per_side=points_per_side))
    started = time.perf_counter()
    summary = run_label(config, show_progress=False)
    seconds = time.perf_counter() - started
    assert summary.run_ok == (limit or summary.listed), summary  # every image labelled, none lost
    return seconds


@click.command()
@click.option("--num-images", default=48, show_default=True, help="Images (even; half for the short run).")
@click.option("--size", default=320, show_default=True, help="Image side in pixels.")
@click.option("--preset", default="tiny", show_default=True, help="Model preset.")
@click.option("--mode", type=click.Choice(["box", "auto"]), default="box", show_default=True)
@click.option("--points-per-side", default=8, show_default=True, help="Auto mode grid.")
@click.option("--batch-size", default=4, show_default=True, help="Pipeline batch size.")
def main(num_images: int, size: int, preset: str, mode: str, points_per_side: int, batch_size: int) -> None:
    import ray

    from jobs.shapes import ShapesConfig, generate
    from pipelines.config import LabelConfig
    from pipelines.label import plan_workers

    work = Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    prompts = generate(ShapesConfig(out=str(work / "data"), num_images=num_images, size=size))
    coco = json.loads(prompts.read_text())
    names = {image["id"]: image["file_name"] for image in coco["images"]}
    boxes: dict[str, list] = {}
    for annotation in coco["annotations"]:
        x, y, w, h = annotation["bbox"]
        boxes.setdefault(names[annotation["image_id"]], []).append([x, y, x + w, y + h])
    paths = sorted((work / "data" / "images").iterdir())
    box_arrays = {name: np.asarray(b, np.float32) for name, b in boxes.items()}
    prompts_per_image = sum(len(b) for b in boxes.values()) / num_images

    # The bare loop gets the torch threads a model actor of the pipeline gets on this machine: the same
    # compute for the model, so the ratio measures the pipeline around it.
    threads = plan_workers(LabelConfig(input="in", output="out"), os.cpu_count() or 1, 0).cpus_per_worker
    bare_ips, load_s, bare_peak = bare_loop(paths, box_arrays, preset, mode, points_per_side, threads)

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    # Warm-up: Ray starts and caches its worker processes (Python + torch imports) on the first dataset.
    pipeline_run(work / "data" / "images", prompts, work / "out_warmup", preset, mode, points_per_side,
                 batch_size, limit=batch_size)
    half = num_images // 2
    with PeakRss() as half_memory:
        short_s = pipeline_run(work / "data" / "images", prompts, work / "out_half", preset, mode, points_per_side,
                               batch_size, limit=half)
    with PeakRss() as full_memory:  # twice the images: a bounded pipeline peaks at the same memory
        full_s = pipeline_run(work / "data" / "images", prompts, work / "out_full", preset, mode, points_per_side,
                              batch_size, limit=None)
    ray.shutdown()
    # The bare loop again: on a shared machine the load drifts; before/after brackets the pipeline runs.
    bare_after_ips, _, _ = bare_loop(paths, box_arrays, preset, mode, points_per_side, threads)
    bare_ips_mean = (bare_ips + bare_after_ips) / 2

    end_to_end = num_images / full_s
    steady = (num_images - half) / (full_s - short_s) if full_s > short_s else float("nan")
    results = {
        "machine": f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
        "torch_threads_per_model": threads,
        "preset": preset, "mode": mode, "images": num_images, "image_size": size,
        "prompts_per_image": round(prompts_per_image, 2) if mode == "box" else points_per_side ** 2,
        "bare_loop_images_per_s": {"before": round(bare_ips, 3), "after": round(bare_after_ips, 3)},
        "pipeline_end_to_end_images_per_s": round(end_to_end, 3),
        "pipeline_steady_state_images_per_s": round(steady, 3),
        "steady_state_ratio_pipeline_over_bare": round(steady / bare_ips_mean, 3),
        "end_to_end_ratio_pipeline_over_bare": round(end_to_end / bare_ips_mean, 3),
        "model_load_s": round(load_s, 2),
        "bare_loop_peak_rss_mib": round(bare_peak / 2**20),
        "pipeline_peak_rss_mib_driver_plus_ray": {"half": round(half_memory.peak / 2**20),
                                                  "full": round(full_memory.peak / 2**20)},
        "pipeline_run_seconds": {"half": round(short_s, 2), "full": round(full_s, 2)},
    }
    for key, value in results.items():
        click.echo(f"{key:42s} {value}")
    click.echo(json.dumps(results))


if __name__ == "__main__":
    main()
