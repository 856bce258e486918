"""Scale of the driver-side steps, measured on synthetic outputs and manifests (no model, no Ray):

    python benchmarks/bench_scale.py                      # 10^6 manifest URIs, 10^5 done images
    python benchmarks/bench_scale.py --scale 0.1          # a tenth of both, for a quick look

* listing: a manifest of ``--manifest-uris`` URIs (the images need not exist) read by `list_inputs`, as the
  driver does today: URIs/s and the driver's peak RSS growth while listing.
* output: ``--done-images`` images rows (no annotations) written as parts of ``--part-size`` images with the
  real `OutputStore.write_part`; then the files per 10^5 images, and the resume steps a run does before it
  labels (`recover` + `done_uris`): seconds and peak RSS growth.
Each measurement runs in a fresh process, so the peaks do not mix. Figures are printed as JSON.
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

import click

FILES_PER = 100_000  # the unit: files per 10^5 images


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def _listing(manifest: str, queue) -> None:
    from pipelines.storage import list_inputs

    before = _peak_rss_mb()
    started = time.monotonic()
    listing = list_inputs(manifest)
    seconds = time.monotonic() - started
    queue.put({"uris": len(listing.uris), "seconds": round(seconds, 2),
               "uris_per_second": round(len(listing.uris) / seconds), "driver_peak_rss_mb": round(_peak_rss_mb()),
               "rss_growth_mb": round(_peak_rss_mb() - before)})


def _resume(output: str, queue) -> None:
    from pipelines.output import OutputStore

    before = _peak_rss_mb()
    started = time.monotonic()
    store = OutputStore(output)
    store.recover()
    done = store.done_uris()
    seconds = time.monotonic() - started
    queue.put({"done_images": len(done), "seconds": round(seconds, 2), "driver_peak_rss_mb": round(_peak_rss_mb()),
               "rss_growth_mb": round(_peak_rss_mb() - before)})


def _in_process(target, *args) -> dict:
    queue = multiprocessing.get_context("spawn").Queue()
    process = multiprocessing.get_context("spawn").Process(target=target, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def _write_output(output: str, images: int, part_size: int) -> None:
    import pyarrow as pa

    from pipelines.output import OutputStore
    from schemas.annotations import AnnotationColumns
    from schemas.tables import IMAGES_SCHEMA

    store = OutputStore(output)
    empty = AnnotationColumns.empty().to_table()
    for start in range(0, images, part_size):
        n = min(part_size, images - start)
        uris = [f"s3://bucket/collection/{i:09d}.jpg" for i in range(start, start + n)]
        rows = pa.table({"image_uri": uris, "width": [640] * n, "height": [480] * n, "status": ["ok"] * n,
                         "error_kind": [None] * n, "error": [None] * n, "num_annotations": [0] * n},
                        schema=IMAGES_SCHEMA)
        store.write_part(rows, empty, {"model": "bench"})


@click.command()
@click.option("--manifest-uris", default=1_000_000, show_default=True)
@click.option("--done-images", default=100_000, show_default=True)
@click.option("--part-size", default=5000, show_default=True, help="as label --part-size")
@click.option("--scale", default=1.0, show_default=True, help="multiply both sizes (e.g. 0.1 when time is short)")
def main(manifest_uris: int, done_images: int, part_size: int, scale: float) -> None:
    manifest_uris, done_images = int(manifest_uris * scale), int(done_images * scale)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp, "manifest.txt")
        manifest.write_text("".join(f"s3://bucket/collection/{i:09d}.jpg\n" for i in range(manifest_uris)))
        listing = _in_process(_listing, str(manifest))

        output = str(Path(tmp, "out"))
        started = time.monotonic()
        _write_output(output, done_images, part_size)
        write_seconds = time.monotonic() - started
        files = sum(1 for p in Path(output).rglob("*") if p.is_file() and p.suffix == ".parquet")
        resume = _in_process(_resume, output)
    print(json.dumps({"listing": listing,
                      "output": {"images": done_images, "part_size": part_size, "parquet_files": files,
                                 "files_per_1e5_images": round(files * FILES_PER / max(1, done_images), 1),
                                 "write_seconds": round(write_seconds, 1)},
                      "resume": resume}, indent=2))


if __name__ == "__main__":
    main()
