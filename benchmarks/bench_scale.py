"""Scale of a run's input side, measured on synthetic manifests, folders and outputs (no model):

    python benchmarks/bench_scale.py                      # 10^6 manifest URIs, 10^5 files, 10^5 done images
    python benchmarks/bench_scale.py --scale 0.1          # a tenth of each, for a quick look

* manifest: a text manifest of ``--manifest-uris`` URIs (the images need not exist) turned into the run's work
  (`pipelines.inputs.work_dataset`: read by Ray Data, de-duplicated by its shuffle, ``--limit 10``) as
  ``ovsam-batch label`` does: seconds until the first image could be fetched, URIs/s, and the driver's peak RSS
  and private-memory growth from after the imports (the driver holds no URI list; the rows live in Ray's object
  store).
* listing: a local folder of ``--folder-files`` empty image files listed by the streamed listing read task:
  seconds to the first block (when labelling can start), files/s over the whole listing.
* output: ``--done-images`` images rows (no annotations) written as parts of ``--part-size`` images with the
  real `OutputStore.write_part`; the files per 10^5 images; then the resume a run does before it labels
  (`recover` + the anti-join of a manifest of the same URIs plus 10 new ones against the committed images):
  seconds, driver peak RSS growth, and the images left to label (10).
Each measurement runs in a fresh process with its own local Ray (2 CPUs), so the peaks do not mix. Figures are
printed as JSON.
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import tempfile
import threading
import time
from pathlib import Path
from queue import Empty

import click
import psutil

FILES_PER = 100_000  # the unit: files per 10^5 images
NEW_IMAGES = 10  # manifest URIs beyond the done ones in the resume measurement: what is left to label
RAY_CPUS = 2  # the local Ray of each measurement


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


class _PeakPrivateMemory(threading.Thread):
    """Samples the driver's private memory (USS: RSS without pages shared with other processes, such as the
    object store's shared memory that the driver maps to read a block) until stopped; ``peak_mb``."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_mb, self._stopped = 0.0, threading.Event()

    def run(self) -> None:
        process = psutil.Process()
        while not self._stopped.wait(0.05):
            self.peak_mb = max(self.peak_mb, process.memory_full_info().uss / 2**20)

    def stop(self) -> float:
        self._stopped.set()
        self.join()
        return self.peak_mb


def _work(spec: str, output: str | None, limit: int | None) -> tuple[int, int]:
    """(images to label, images skipped as done) of ``spec`` into ``output``, as a run plans them."""
    import ray

    from pipelines.inputs import InputTally, describe_input, shuffle_partitions, work_dataset
    from pipelines.output import OutputStore
    from pipelines.storage import STORAGE_ATTEMPTS

    done_parts = []
    if output:
        store = OutputStore(output)
        store.recover()
        done_parts = store.committed_parts()
    tally = ray.remote(num_cpus=0)(InputTally).remote()
    work = work_dataset(describe_input(spec, None, STORAGE_ATTEMPTS), box_mode=False, done_parts=done_parts,
                        output=output, prompts_ref=None, tally=tally, limit=limit,
                        partitions=shuffle_partitions(RAY_CPUS))
    next(iter(work.dataset.iter_batches(batch_size=1)))  # the first image the decode stage would fetch
    return work.todo, ray.get(tally.result.remote())[0].get("skipped_done", 0)


def _measure_work(spec: str, output: str | None, limit: int | None, queue) -> None:
    import ray

    import pipelines.inputs  # noqa: F401 - imported before the baseline: the growth is the run's, not the imports'
    import pipelines.output  # noqa: F401

    ray.init(num_cpus=RAY_CPUS, include_dashboard=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    before, private = _peak_rss_mb(), _PeakPrivateMemory()
    baseline = psutil.Process().memory_full_info().uss / 2**20
    private.start()
    started = time.monotonic()
    todo, skipped = _work(spec, output, limit)
    seconds = time.monotonic() - started
    queue.put({"seconds_to_first_image": round(seconds, 2), "todo": todo, "skipped_done": skipped,
               "driver_peak_rss_mb": round(_peak_rss_mb()), "driver_rss_growth_mb": round(_peak_rss_mb() - before),
               "driver_private_growth_mb": round(private.stop() - baseline)})
    ray.shutdown()


def _measure_listing(folder: str, queue) -> None:
    import ray

    from pipelines.inputs import _source_rows, describe_input
    from pipelines.storage import STORAGE_ATTEMPTS

    ray.init(num_cpus=RAY_CPUS, include_dashboard=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    before = _peak_rss_mb()
    started = time.monotonic()
    first, files = None, 0
    for batch in _source_rows(describe_input(folder, None, STORAGE_ATTEMPTS)).iter_batches(batch_size=None):
        first = first or time.monotonic() - started
        files += len(batch["source_uri"])
    seconds = time.monotonic() - started
    queue.put({"files": files, "seconds_to_first_block": round(first, 2), "seconds": round(seconds, 2),
               "files_per_second": round(files / seconds), "driver_rss_growth_mb": round(_peak_rss_mb() - before)})
    ray.shutdown()


def _in_process(target, *args) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    while process.is_alive() or not queue.empty():  # a measurement that fails ends the benchmark, not a hang
        try:
            return queue.get(timeout=1)
        except Empty:  # still measuring
            continue
    raise SystemExit(f"{target.__name__} failed in its process (exit code {process.exitcode}); see above")


def _uri(index: int) -> str:
    return f"s3://bucket/collection/{index:09d}.jpg"


def _write_output(output: str, images: int, part_size: int) -> None:
    import pyarrow as pa

    from pipelines.output import OutputStore
    from schemas.annotations import AnnotationColumns
    from schemas.tables import IMAGES_SCHEMA

    store = OutputStore(output)
    empty = AnnotationColumns.empty().to_table()
    for start in range(0, images, part_size):
        n = min(part_size, images - start)
        rows = pa.table({"image_uri": [_uri(i) for i in range(start, start + n)], "width": [640] * n,
                         "height": [480] * n, "status": ["ok"] * n, "error_kind": [None] * n, "error": [None] * n,
                         "num_annotations": [0] * n}, schema=IMAGES_SCHEMA)
        store.write_part(rows, empty, {"model": "bench"})


@click.command()
@click.option("--manifest-uris", default=1_000_000, show_default=True)
@click.option("--folder-files", default=100_000, show_default=True)
@click.option("--done-images", default=100_000, show_default=True)
@click.option("--part-size", default=5000, show_default=True, help="as label --part-size")
@click.option("--scale", default=1.0, show_default=True, help="multiply the sizes (e.g. 0.1 when time is short)")
def main(manifest_uris: int, folder_files: int, done_images: int, part_size: int, scale: float) -> None:
    manifest_uris, folder_files = int(manifest_uris * scale), int(folder_files * scale)
    done_images = int(done_images * scale)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp, "manifest.txt")
        manifest.write_text("".join(f"{_uri(i)}\n" for i in range(manifest_uris)))
        results["manifest"] = {"uris": manifest_uris, **_in_process(_measure_work, str(manifest), None, 10)}
        results["manifest"]["uris_per_second"] = round(manifest_uris / results["manifest"]["seconds_to_first_image"])

        folder = Path(tmp, "folder")
        for index in range(folder_files):
            path = folder / f"{index // 1000:04d}" / f"{index:09d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        results["listing"] = _in_process(_measure_listing, str(folder))

        output = str(Path(tmp, "out"))
        started = time.monotonic()
        _write_output(output, done_images, part_size)
        files = sum(1 for p in Path(output).rglob("*") if p.is_file() and p.suffix == ".parquet")
        results["output"] = {"images": done_images, "part_size": part_size, "parquet_files": files,
                             "files_per_1e5_images": round(files * FILES_PER / max(1, done_images), 1),
                             "write_seconds": round(time.monotonic() - started, 1)}
        resumed = Path(tmp, "resume.txt")
        resumed.write_text("".join(f"{_uri(i)}\n" for i in range(done_images + NEW_IMAGES)))
        results["resume"] = _in_process(_measure_work, str(resumed), output, None)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
