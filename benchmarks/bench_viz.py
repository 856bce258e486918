"""Memory and time of `ovsam-batch report` / `show` on a large label output (a million annotation rows).

Writes a synthetic output in the label schema (real RLEs of drawn shapes, repeated; 10 annotations per
image; parts of 10,000 images like a label run's), then, each in a fresh process so that peak RSS
belongs to one step:

* ``report``: the whole report (streaming statistics, gallery sample; source images do not exist,
  so the gallery draws masks on grey, which costs about as much as real crops);
* ``show``: sampling 16 images and drawing them;
* ``full load``: reading the annotations table whole with pyarrow, for comparison.

    python benchmarks/bench_viz.py --annotations 1000000 --work /tmp/viz-bench

Prints seconds and peak RSS (MiB) per step.
"""

from __future__ import annotations

import argparse
import multiprocessing
import pathlib
import resource
import time

ANNOTATIONS_PER_IMAGE = 10
IMAGES_PER_PART = 10_000
LABELS = 1203  # an LVIS-sized vocabulary, so the long tail is long
IMAGE_SIDE = 640


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _generate(work: pathlib.Path, n_annotations: int) -> None:
    import cv2
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import pycocotools.mask as mask_utils

    from schemas.tables import ANNOTATIONS_SCHEMA, IMAGES_SCHEMA

    rng = np.random.default_rng(0)
    shapes = []  # a pool of real masks: (rle counts, bbox, area)
    for _ in range(64):
        mask = np.zeros((IMAGE_SIDE, IMAGE_SIDE), np.uint8)
        centre = rng.integers(60, IMAGE_SIDE - 60, 2)
        cv2.circle(mask, (int(centre[0]), int(centre[1])), int(rng.integers(5, 55)), 1, -1)
        rle = mask_utils.encode(np.asfortranarray(mask))
        shapes.append((rle["counts"].decode(), [float(v) for v in mask_utils.toBbox(rle)], int(mask_utils.area(rle))))
    n_images = n_annotations // ANNOTATIONS_PER_IMAGE
    label_names = [f"class_{i:04d}" for i in range(LABELS)]
    for table in ("images", "annotations"):
        (work / table).mkdir(parents=True, exist_ok=True)
    for part, start in enumerate(range(0, n_images, IMAGES_PER_PART)):
        count = min(IMAGES_PER_PART, n_images - start)
        uris = [f"/nonexistent/images/img_{i:08d}.jpg" for i in range(start, start + count)]
        images = pa.table({
            "image_uri": uris, "width": pa.array([IMAGE_SIDE] * count, pa.int32()),
            "height": pa.array([IMAGE_SIDE] * count, pa.int32()), "status": ["ok"] * count,
            "error_kind": pa.nulls(count, pa.string()), "error": pa.nulls(count, pa.string()),
            "num_annotations": pa.array([ANNOTATIONS_PER_IMAGE] * count, pa.int32()),
        })
        rows = count * ANNOTATIONS_PER_IMAGE
        pick = rng.integers(0, len(shapes), rows)
        label_ids = np.minimum(rng.zipf(1.3, rows) - 1, LABELS - 1).astype(np.int32)  # long-tailed
        annotations = pa.table({
            "image_uri": np.repeat(uris, ANNOTATIONS_PER_IMAGE),
            "annotation_id": np.arange(start * ANNOTATIONS_PER_IMAGE, start * ANNOTATIONS_PER_IMAGE + rows),
            "bbox": pa.array([shapes[k][1] for k in pick], pa.list_(pa.float32(), 4)),
            "segmentation": pa.array([{"size": [IMAGE_SIDE, IMAGE_SIDE], "counts": shapes[k][0]} for k in pick],
                                     ANNOTATIONS_SCHEMA.field("segmentation").type),
            "area": np.array([shapes[k][2] for k in pick], np.int64),
            "label": [label_names[i] for i in label_ids], "label_id": label_ids,
            "score": rng.uniform(0, 1, rows).astype(np.float32),
            "topk_labels": pa.array([[label_names[i]] for i in label_ids], pa.list_(pa.string())),
            "topk_label_ids": pa.array([[int(i)] for i in label_ids], pa.list_(pa.int32())),
            "topk_scores": pa.array([[0.5]] * rows, pa.list_(pa.float32())),
            "prompt_type": ["grid"] * rows,
            "prompt": pa.array([[320.0, 320.0]] * rows, pa.list_(pa.float32())),
        })
        pq.write_table(images.cast(IMAGES_SCHEMA), work / "images" / f"part-{part:05d}.parquet")
        pq.write_table(annotations.cast(ANNOTATIONS_SCHEMA), work / "annotations" / f"part-{part:05d}.parquet")


def _step(name: str, work: str, queue) -> None:
    start = time.perf_counter()
    if name == "imports":
        import pipelines.viz.report  # noqa: F401 - the modules' own footprint, the floor of the other steps
        import pipelines.viz.show  # noqa: F401
    elif name == "report":
        from pipelines.viz.report import ReportConfig, write_report

        write_report(ReportConfig(output=work, out_file=f"{work}/report.html"))
    elif name == "show":
        from pipelines.viz.show import ShowConfig, show

        show(ShowConfig(output=work, out_dir=f"{work}/show"))
    elif name == "full load":
        import pyarrow.dataset as ds

        ds.dataset(f"{work}/annotations", format="parquet").to_table()
    queue.put((name, time.perf_counter() - start, _peak_rss_mib()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--annotations", type=int, default=1_000_000)
    parser.add_argument("--work", type=pathlib.Path, default=pathlib.Path("/tmp/viz-bench"))
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    marker = args.work / f".generated-{args.annotations}"
    if not marker.exists():
        started = time.perf_counter()
        child = context.Process(target=_generate, args=(args.work, args.annotations))
        child.start()
        child.join()
        marker.touch()
        print(f"generated {args.annotations:,} annotations in {time.perf_counter() - started:.1f} s under {args.work}")
    baseline = context.Queue()
    probe = context.Process(target=_step, args=("imports", str(args.work), baseline))
    probe.start()
    probe.join()
    print(f"{'step':<10}{'seconds':>10}{'peak RSS MiB':>14}")
    _, _, idle = baseline.get()
    print(f"{'(imports)':<10}{'':>10}{idle:>14.0f}")
    for name in ("report", "show", "full load"):
        queue = context.Queue()
        child = context.Process(target=_step, args=(name, str(args.work), queue))
        child.start()
        child.join()
        _, seconds, peak = queue.get()
        print(f"{name:<10}{seconds:>10.1f}{peak:>14.0f}")


if __name__ == "__main__":
    main()
