"""Resume: the CLI is killed (SIGKILL) part-way, the same command is run again, every image ends up exactly once.

Two more kill instants are produced by hand after the kill, exactly as the commit protocol
(`pipelines.output`) leaves them: one part killed after its commit point but between its two moves (its
annotations published, its images file still staged: rolled forward), and one part killed before its commit
point (its annotations staged, no images file: rolled back, its images labelled again).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.output import OutputStore
from schemas.committed import part_file
from schemas.tables import ANNOTATIONS_DIR, IMAGES_DIR, STAGING_DIR
from tests.pipeline_cases import shapes_image

NUM_IMAGES = 40  # five input blocks: the kill lands while later blocks are still in the model
BATCH_SIZE = 2
PART_SIZE = 4  # images per part: parts span model batches
# Seconds to let Ray reap the killed driver's actors before the re-run (a dying writer must not publish
# while the next run lists the output).
_REAP_WAIT_S = 5
_RUN_TIMEOUT_S = 240


def _cli(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "ovsam-batch"), "label", *args]


@pytest.mark.slow
def test_killed_run_resumes_with_every_image_exactly_once(ray_cluster, tmp_path):
    images_dir, output = tmp_path / "images", tmp_path / "out"
    images_dir.mkdir()
    boxes: dict[str, list] = {}
    for index in range(NUM_IMAGES):
        name = f"img_{index:02d}.jpg"
        shapes_image(index, 64, 48).save(images_dir / name)
        boxes[name] = [[4, 4, 20, 20], [30, 10, 30, 30]][: 1 + index % 2]
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({
        "images": [{"id": i, "file_name": name} for i, name in enumerate(boxes)],
        "annotations": [{"id": k, "image_id": i, "bbox": box} for k, (i, box) in
                        enumerate((i, b) for i, bs in enumerate(boxes.values()) for b in bs)]}))
    command = _cli(str(images_dir), "--output", str(output), "--mode", "box", "--prompts", str(prompts),
                   "--batch-size", str(BATCH_SIZE), "--part-size", str(PART_SIZE), "--address", ray_cluster.address, "--coco")

    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + _RUN_TIMEOUT_S
    while len(list((output / IMAGES_DIR).glob("part-*.parquet"))) < 2:
        assert first.poll() is None, "the run finished before it could be killed"
        assert time.monotonic() < deadline, "no part was published in time"
        time.sleep(0.2)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    time.sleep(_REAP_WAIT_S)

    store = OutputStore(str(output))
    committed = store.committed_parts()
    done_before = set(store.read_table(IMAGES_DIR, columns=["image_uri"]).column("image_uri").to_pylist())
    assert 0 < len(done_before) < NUM_IMAGES, "the kill must land part-way"
    # Killed between the two moves of a committed part: annotations published, images file still staged.
    (output / STAGING_DIR / committed[0]).mkdir(parents=True)
    (output / part_file(IMAGES_DIR, committed[0])).rename(output / STAGING_DIR / committed[0] / "images.parquet")
    # Killed before the commit point: annotations staged, no images file; its images get labelled again.
    (output / STAGING_DIR / committed[1]).mkdir()
    (output / part_file(ANNOTATIONS_DIR, committed[1])).rename(
        output / STAGING_DIR / committed[1] / "annotations.parquet")
    (output / part_file(IMAGES_DIR, committed[1])).unlink()

    second = subprocess.run(command, capture_output=True, text=True, timeout=_RUN_TIMEOUT_S)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Skipped" in second.stdout
    assert "finished publishing 1 committed part(s), removed 1 unfinished part(s)" in second.stdout

    images = store.read_table(IMAGES_DIR).to_pylist()
    annotations = store.read_table(ANNOTATIONS_DIR).to_pylist()
    uris = [row["image_uri"] for row in images]
    assert sorted(uris) == sorted(f"file://{images_dir}/{name}" for name in boxes)  # each exactly once
    assert all(row["status"] == "ok" for row in images)
    ids = [row["annotation_id"] for row in annotations]
    assert len(ids) == len(set(ids)) == sum(len(b) for b in boxes.values())  # no annotation twice or lost
    assert [f"part-{i}.parquet" for i in store.committed_parts()] == sorted(
        p.name for p in (output / ANNOTATIONS_DIR).glob("*"))
    assert committed[0] in store.committed_parts() and committed[1] not in store.committed_parts()
    assert not list((output / STAGING_DIR).rglob("*"))
    part_images = [len(store.read_table(IMAGES_DIR, [i])) for i in store.committed_parts()]
    # A part holds several model batches: published once it reaches PART_SIZE, so less than a batch over.
    assert BATCH_SIZE < PART_SIZE <= max(part_images) < PART_SIZE + BATCH_SIZE
    coco = json.loads((output / "coco.json").read_text())
    assert len(coco["images"]) == NUM_IMAGES and len(coco["annotations"]) == len(ids)


def _box_inputs(tmp_path: Path, count: int) -> tuple[Path, Path]:
    """``count`` small images, one box each, and their COCO prompts file."""
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    names = [f"img_{index:02d}.jpg" for index in range(count)]
    for index, name in enumerate(names):
        shapes_image(index, 64, 48).save(images_dir / name)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"images": [{"id": i, "file_name": n} for i, n in enumerate(names)],
                                   "annotations": [{"id": i, "image_id": i, "bbox": [4, 4, 20, 20]}
                                                   for i in range(count)]}))
    return images_dir, prompts


@pytest.mark.slow
def test_ctrl_c_leaves_run_json_interrupted_and_the_output_free(ray_cluster, tmp_path):
    images_dir, prompts = _box_inputs(tmp_path, NUM_IMAGES)
    output = tmp_path / "out"
    run = subprocess.Popen(_cli(str(images_dir), "-o", str(output), "--mode", "box", "--prompts", str(prompts),
                                "--batch-size", str(BATCH_SIZE), "--address", ray_cluster.address),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + _RUN_TIMEOUT_S
    record = output / "run.json"
    while not (record.exists() and json.loads(record.read_text())["status"] == "running"):
        assert run.poll() is None, run.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run never started"
        time.sleep(0.1)
    run.send_signal(signal.SIGINT)  # what Ctrl-C sends
    stdout, stderr = run.communicate(timeout=_RUN_TIMEOUT_S)
    assert run.returncode == 128 + signal.SIGINT, stderr[-3000:]
    assert "Interrupted:" in stderr and "the same command resumes" in stderr
    assert "Traceback" not in stderr, stderr[-3000:]
    finished = json.loads(record.read_text())
    assert finished["status"] == "interrupted" and "SIGINT" in finished["error"] and finished["finished_at"]
    assert not (output / "_lease.json").exists()  # released: the same command can run again at once


def test_the_progress_bar_counts_the_images_already_committed(ray_cluster, tmp_path, capsys):
    from pipelines.config import LabelConfig
    from pipelines.label import run_label

    images_dir, prompts = _box_inputs(tmp_path, 5)
    config = LabelConfig(input=str(images_dir), output=str(tmp_path / "out"), mode="box", prompts=str(prompts))
    run_label(dataclasses.replace(config, limit=3), show_progress=False)
    capsys.readouterr()
    summary = run_label(config, show_progress=True)
    assert summary.skipped_done == 3 and summary.run_images == 2
    bar = capsys.readouterr().err
    assert re.search(r"labelling: +\d+%\|.*\| 3/5 ", bar), bar  # starts at what the first run committed
    assert re.search(r"labelling: 100%\|.*\| 5/5 ", bar), bar
