"""Inputs as a Ray dataset (`pipelines.inputs`): folders, globs and manifests read by Ray Data on the session's real
local Ray, duplicates gathered, box rows of a CSV/Parquet manifest, and the resume anti-join against committed parts."""

from __future__ import annotations

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from ovsam import PromptError
from pipelines.inputs import (LISTING_BLOCK_ROWS, NO_URI, InputError, InputTally, _source_rows, describe_input,
                              work_dataset)
from pipelines.output import OutputStore
from pipelines.storage import STORAGE_ATTEMPTS
from schemas.annotations import AnnotationColumns
from schemas.tables import IMAGES_SCHEMA


def _work(spec: str, *, output: str | None = None, box_mode: bool = False, prompts: dict | None = None,
          limit: int | None = None, endpoint_url: str | None = None) -> tuple[list[dict], dict, int]:
    """(rows to label, tally counts, prompt names matched) of ``spec`` as a run would plan them."""
    source = describe_input(spec, endpoint_url, STORAGE_ATTEMPTS)
    done_parts = OutputStore(output).committed_parts() if output else []
    tally = ray.remote(num_cpus=0)(InputTally).remote()
    work = work_dataset(source, box_mode=box_mode, done_parts=done_parts, output=output,
                        prompts_ref=ray.put(prompts) if prompts is not None else None, tally=tally, limit=limit,
                        partitions=2)
    rows = work.dataset.take_all()
    counts, matched = ray.get(tally.result.remote())
    return rows, counts, matched


def _uris(rows: list[dict]) -> list[str]:
    return sorted(row["source_uri"] for row in rows)


def _boxes(row: dict) -> list[list[float]]:
    return np.frombuffer(row["prompt_boxes"], np.float32).reshape(-1, 4).tolist()


def test_folder_glob_and_text_manifest(ray_cluster, tmp_path):
    for name in ("b.jpg", "a.PNG", "sub/c.jpeg", "notes.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    rows, counts, _ = _work(str(tmp_path))
    assert _uris(rows) == [f"file://{tmp_path}/{name}" for name in ("a.PNG", "b.jpg", "sub/c.jpeg")]
    assert counts == {"listed": 3, "skipped_done": 0, "ignored": 1}
    assert [row["image_uri"] for row in rows] == [row["source_uri"] for row in rows]
    assert _uris(_work(str(tmp_path / "*.jpg"))[0]) == [f"file://{tmp_path}/b.jpg"]
    assert _uris(_work(str(tmp_path / "**" / "*.jpeg"))[0]) == [f"file://{tmp_path}/sub/c.jpeg"]

    # Comments and blank lines skipped, a line listed twice is one input, relative paths are the manifest's.
    (tmp_path / "list.txt").write_text("# images\nb.jpg\n\n  sub/c.jpeg  \nb.jpg\ns3://bucket/x.jpg\n")
    rows, counts, _ = _work(str(tmp_path / "list.txt"))
    assert _uris(rows) == [f"file://{tmp_path}/b.jpg", f"file://{tmp_path}/sub/c.jpeg", "s3://bucket/x.jpg"]
    assert counts["listed"] == 3
    assert len(_work(str(tmp_path / "list.txt"), limit=2)[0]) == 2
    with pytest.raises(FileNotFoundError):
        describe_input(str(tmp_path / "nope"), None, STORAGE_ATTEMPTS)


def test_manifest_paths_are_normalised_so_one_image_has_one_uri(ray_cluster, tmp_path):
    (tmp_path / "repo").mkdir()
    (tmp_path / "man").mkdir()
    (tmp_path / "repo" / "a.jpg").write_bytes(b"x")
    (tmp_path / "man" / "list.txt").write_text(
        f"../repo/a.jpg\nfile://{tmp_path}/man/../repo/a.jpg\n{tmp_path}/repo/./a.jpg\n")
    expected = [f"file://{tmp_path}/repo/a.jpg"]
    assert _uris(_work(str(tmp_path / "man" / "list.txt"))[0]) == expected
    assert _uris(_work(f"{tmp_path}/man/../repo")[0]) == expected


def test_a_folder_larger_than_a_block_streams_in_blocks_each_file_once(ray_cluster, tmp_path):
    for index in range(LISTING_BLOCK_ROWS + 50):  # nested folders, more files than one block holds
        folder = tmp_path / f"d{index % 3}" / f"e{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{index:05d}.jpg").write_bytes(b"")
    source = describe_input(str(tmp_path), None, STORAGE_ATTEMPTS)
    assert _source_rows(source).materialize().num_blocks() >= 2  # yielded as listed, not as one list at the end
    rows, counts, _ = _work(str(tmp_path))
    assert len(rows) == counts["listed"] == LISTING_BLOCK_ROWS + 50 == len(set(_uris(rows)))


def test_s3_prefix_and_manifest(ray_cluster, s3_server):
    bucket = s3_server.make_bucket("inputs-test")
    fs = fsspec.filesystem("s3")
    for name in ("in/1.jpg", "in/2.jpg", "in/deeper/3.png", "in/deeper/notes.md", "other/4.jpg"):
        fs.pipe(f"{bucket}/{name}", b"x")
    rows, counts, _ = _work(f"{bucket}/in")
    assert _uris(rows) == [f"{bucket}/in/1.jpg", f"{bucket}/in/2.jpg", f"{bucket}/in/deeper/3.png"]
    assert counts["ignored"] == 1
    assert _uris(_work(f"{bucket}/in/*.jpg")[0]) == [f"{bucket}/in/1.jpg", f"{bucket}/in/2.jpg"]
    assert len(_work(f"{bucket}/in", endpoint_url=s3_server.endpoint_url)[0]) == 3  # the explicit endpoint option
    fs.pipe(f"{bucket}/lists/m.txt", b"../in/2.jpg\ns3://inputs-test/other/4.jpg\n")
    assert _uris(_work(f"{bucket}/lists/m.txt")[0]) == [f"{bucket}/in/2.jpg", f"{bucket}/other/4.jpg"]


def test_resume_drops_committed_images_without_a_driver_side_set(ray_cluster, tmp_path):
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "in" / name).write_bytes(b"x")
    store = OutputStore(str(tmp_path / "out"))
    done = [f"file://{tmp_path}/in/{name}" for name in ("a.jpg", "c.jpg")]
    images = pa.table({"image_uri": done, "width": [8, 8], "height": [8, 8], "status": ["ok", "error"],
                       "error_kind": [None, "corrupt"], "error": [None, "bad"], "num_annotations": [0, 0]},
                      schema=IMAGES_SCHEMA)
    store.write_part(images, AnnotationColumns.empty().to_table(), {"model": "test"})
    store.write_part(images.slice(0, 0), AnnotationColumns.empty().to_table(), {"model": "test"})  # an empty part
    rows, counts, _ = _work(str(tmp_path / "in"), output=str(tmp_path / "out"))
    assert _uris(rows) == [f"file://{tmp_path}/in/b.jpg"]
    assert counts == {"listed": 3, "skipped_done": 2, "ignored": 0}


def test_box_prompts_in_csv_and_parquet_manifests(ray_cluster, tmp_path):
    # One box a row (x0, y0, x1, y1), an image's rows apart; a row without a box; a malformed row.
    (tmp_path / "rows.csv").write_text("uri,x0,y0,x1,y1,note\n"
                                       "a.jpg,1,2,10,20,first\n"
                                       "b.jpg,,,,,no box\n"
                                       "a.jpg,5,5,6,6,second\n"
                                       "c.jpg,1,two,3,4,typo\n"
                                       "d.jpg,1,2,3,,missing corner\n")
    rows, _, _ = _work(str(tmp_path / "rows.csv"), box_mode=True)
    by_name = {row["image_uri"].rsplit("/", 1)[1]: row for row in rows}
    assert sorted(_boxes(by_name["a.jpg"])) == [[1, 2, 10, 20], [5, 5, 6, 6]]
    assert _boxes(by_name["b.jpg"]) == [] and by_name["b.jpg"]["entry_error"] == ""
    assert by_name["c.jpg"]["entry_error_kind"] == by_name["d.jpg"]["entry_error_kind"] == PromptError.INVALID
    assert "not 4 numbers" in by_name["c.jpg"]["entry_error"] and "two" in by_name["c.jpg"]["entry_error"]
    assert "not 4 numbers" in by_name["d.jpg"]["entry_error"]

    # A list column: Parquet list<list<double>>, CSV JSON text.
    pq.write_table(pa.table({"uri": ["a.jpg", "b.jpg", "c.jpg"],
                             "boxes": [[[1, 2, 3, 4], [5, 6, 7, 8]], [], [[1, 2, 3]]]}), tmp_path / "lists.parquet")
    rows, _, _ = _work(str(tmp_path / "lists.parquet"), box_mode=True)
    by_name = {row["image_uri"].rsplit("/", 1)[1]: row for row in rows}
    assert _boxes(by_name["a.jpg"]) == [[1, 2, 3, 4], [5, 6, 7, 8]] and _boxes(by_name["b.jpg"]) == []
    assert "not a list of [x0, y0, x1, y1]" in by_name["c.jpg"]["entry_error"]
    (tmp_path / "lists.csv").write_text('uri,boxes\na.jpg,"[[1, 2, 3, 4]]"\nb.jpg,[[1 2 3 4]]\n')
    rows, _, _ = _work(str(tmp_path / "lists.csv"), box_mode=True)
    by_name = {row["image_uri"].rsplit("/", 1)[1]: row for row in rows}
    assert _boxes(by_name["a.jpg"]) == [[1, 2, 3, 4]] and "not JSON" in by_name["b.jpg"]["entry_error"]

    # A manifest the run cannot read stops it with a sentence; a row that names no image is an error row of its own.
    (tmp_path / "nouri.csv").write_text("image,x0,y0,x1,y1\na.jpg,1,2,3,4\n")
    with pytest.raises(InputError, match="no 'uri' column"):
        describe_input(str(tmp_path / "nouri.csv"), None, STORAGE_ATTEMPTS)
    (tmp_path / "partial.csv").write_text("uri,x0,y0\na.jpg,1,2\n")
    with pytest.raises(InputError, match="not all of x0, y0, x1, y1"):
        describe_input(str(tmp_path / "partial.csv"), None, STORAGE_ATTEMPTS)
    (tmp_path / "blank.csv").write_text("uri,x0,y0,x1,y1\na.jpg,1,2,3,4\n,1,2,3,4\n,1,2,3,4\n,5,6,7,8\n")
    rows, _, _ = _work(str(tmp_path / "blank.csv"), box_mode=True)
    without = [row for row in rows if row["entry_error_kind"] == NO_URI]
    assert len(rows) == 3 and len(without) == 2  # the same row twice is one row
    assert all("row without a 'uri'" in row["entry_error"] and "#row-without-uri-" in row["image_uri"] for row in without)


def test_prompts_file_names_match_a_manifest_relative_to_its_entries_folder(ray_cluster, tmp_path):
    (tmp_path / "list.txt").write_text("s3://b/photos/x/a.jpg\ns3://b/photos/y/b.jpg\n")
    prompts = {"x/a.jpg": np.array([[1, 2, 3, 4]], np.float32), "s3://b/photos/y/b.jpg": np.array([[0, 0, 5, 5]]),
               "elsewhere.jpg": np.array([[0, 0, 1, 1]])}
    rows, _, matched = _work(str(tmp_path / "list.txt"), box_mode=True, prompts=prompts)
    by_name = {row["image_uri"].rsplit("/", 1)[1]: row for row in rows}
    assert _boxes(by_name["a.jpg"]) == [[1, 2, 3, 4]] and _boxes(by_name["b.jpg"]) == [[0, 0, 5, 5]]
    assert matched == 2  # elsewhere.jpg names no input


def test_training_and_labelling_list_the_same_images(ray_cluster, tmp_path):
    """One list of image suffixes: a folder the labeller would label is the folder training reads."""
    from jobs.data import list_images

    for name in ("a.jpg", "b.webp", "c.TIF", "d.bmp", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    labelled = [uri.rsplit("/", 1)[1] for uri in _uris(_work(str(tmp_path))[0])]
    assert list_images(str(tmp_path)) == labelled == ["a.jpg", "b.webp", "c.TIF", "d.bmp"]


def test_label_a_csv_manifest_with_box_rows(ray_cluster, tmp_path):
    """Box prompts from the manifest's own rows, end to end: each image once, malformed rows as error rows."""
    from pipelines.config import LabelConfig
    from pipelines.label import LabelError, run_label
    from pipelines.predict import NO_PROMPTS
    from schemas.tables import IMAGES_DIR, STATUS_OK
    from tests.pipeline_cases import image_cases

    cases = {case.name: case for case in image_cases(4)}
    for name in ("normal_00.jpg", "normal_01.jpg", "normal_02.jpg", "normal_03.jpg", "cmyk.jpg", "zero_bytes.jpg"):
        (tmp_path / name).write_bytes(cases[name].data)
    (tmp_path / "boxes.csv").write_text("uri,x0,y0,x1,y1\n"
                                        "normal_00.jpg,2,3,22,18\n"
                                        "normal_01.jpg,0,0,72,52\n"
                                        "cmyk.jpg,500,500,510,510\n"  # wholly outside the 80x48 image
                                        "normal_00.jpg,30,10,70,40\n"  # partly outside (64 wide): clipped
                                        "normal_02.jpg,1,2,x,4\n"
                                        "normal_03.jpg,,,,\n"
                                        ",1,2,3,4\n"
                                        "zero_bytes.jpg,1,1,5,5\n")
    config = LabelConfig(input=str(tmp_path / "boxes.csv"), output=str(tmp_path / "out"), mode="box", batch_size=3)
    summary = run_label(config, show_progress=False)
    store = OutputStore(config.output)
    images = {row["image_uri"].rsplit("/", 1)[1]: row for row in store.read_table(IMAGES_DIR).to_pylist()}
    assert len(images) == 7 == summary.run_images and summary.listed == 7
    kinds = {name.split("#")[0] if "#" in name else name: row["error_kind"] for name, row in images.items()}
    assert kinds == {"normal_00.jpg": None, "normal_01.jpg": None, "cmyk.jpg": PromptError.OUTSIDE_IMAGE,
                     "normal_02.jpg": PromptError.INVALID, "normal_03.jpg": NO_PROMPTS, "boxes.csv": NO_URI,
                     "zero_bytes.jpg": "empty"}
    assert images["normal_02.jpg"]["width"] is None  # a malformed row is not even fetched
    annotations = store.read_table("annotations").to_pylist()
    prompts = sorted(a["prompt"] for a in annotations if a["image_uri"].endswith("normal_00.jpg"))
    np.testing.assert_allclose(prompts, [[2, 3, 22, 18], [30, 10, 64, 40]])
    assert images["normal_01.jpg"]["status"] == STATUS_OK and images["normal_01.jpg"]["num_annotations"] == 1

    again = run_label(config, show_progress=False)  # resumed through the shuffle: nothing twice
    assert (again.run_images, again.skipped_done) == (0, 7)
    assert len(store.read_table(IMAGES_DIR)) == 7
    with pytest.raises(LabelError, match="has box columns"):
        run_label(LabelConfig(input=config.input, output=str(tmp_path / "auto")), show_progress=False)
