"""The pipeline's parts without the model: decoding every broken kind, listing, prompts, publishing, resume state."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pytest

from pipelines.config import ConfigError, LabelConfig
from ovsam.images import MAX_IMAGE_PIXELS, DecodeError, decode_image
from ovsam.transforms import ImageFrame, ResizedImage
from pipelines.decode import ReadAndDecode
from pipelines.label import WorkerPlan, plan_workers
from pipelines.output import OutputStore, Recovery
from ovsam import PromptError
from pipelines.predict import (
    MAX_PIXELS_PER_MODEL_CALL,
    NO_PROMPTS,
    PromptCheckError,
    checked_boxes,
    deserialize,
    pixel_groups,
)
from pipelines.prompts import PromptsFileError, load_box_prompts
from ovsam.redaction import redact_text, redact_uri
from pipelines.storage import open_for_publish, open_fs
from schemas.annotations import AnnotationColumns
from schemas.tables import ANNOTATIONS_DIR, IMAGES_DIR, IMAGES_SCHEMA, STAGING_DIR
from tests.pipeline_cases import huge_png_header, image_cases
from tests.test_schemas import LABELS, random_prediction


@pytest.mark.parametrize("case", image_cases(num_normal=1), ids=lambda case: case.name)
def test_decode_gives_rgb_or_the_expected_error_kind(case):
    if case.error_kind:
        with pytest.raises(DecodeError) as caught:
            decode_image(case.data)
        assert caught.value.kind == case.error_kind
        assert str(caught.value)  # a sentence for the images table
        return
    rgb = decode_image(case.data)
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert (rgb.shape[1], rgb.shape[0]) == case.size


def test_sixteen_bit_keeps_its_full_range():
    grey16 = next(c for c in image_cases(0) if c.name == "grey16.png")
    rgb = decode_image(grey16.data)
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[0, -1].tolist() == [255, 255, 255]
    assert len(np.unique(rgb[0, :, 0])) > 30  # a gradient, not saturated to two values


@pytest.mark.parametrize("name", ["grey16.png", "exif_rotated.jpg"])
def test_labeller_training_and_viewers_decode_alike(tmp_path, name):
    """One decoder: the training data reader and the viewers see the labeller's pixels (16-bit range kept,
    EXIF orientation applied), so training, labels and overlays share one frame."""
    from jobs.data import read_image
    from pipelines.viz.reading import read_source_image

    case = next(c for c in image_cases(0) if c.name == name)
    (tmp_path / name).write_bytes(case.data)
    labeller = decode_image(case.data)
    assert (labeller.shape[1], labeller.shape[0]) == case.size
    for reader in (read_image, read_source_image):
        np.testing.assert_array_equal(reader(str(tmp_path / name)), labeller)


def test_the_bomb_limit_reads_only_the_header():
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 1
    with pytest.raises(DecodeError, match="exceeds the limit") as caught:
        decode_image(huge_png_header(side, side))
    assert caught.value.kind == "too_large"


def test_read_stage_turns_a_missing_file_into_an_unreadable_row(tmp_path):
    good = next(c for c in image_cases(1) if c.error_kind is None)
    (tmp_path / "good.jpg").write_bytes(good.data)
    uris = np.array([str(tmp_path / "good.jpg"), str(tmp_path / "missing.jpg")], dtype=object)
    fine = np.array(["", ""], dtype=object)
    out = ReadAndDecode(endpoint_url=None, input_size=64)({"source_uri": uris, "image_uri": uris,
                                                           "entry_error_kind": fine, "entry_error": fine})
    assert list(out["error_kind"]) == ["", "unreadable"]
    assert out["width"][0] == good.size[0] and out["width"][1] == -1
    # What travels on is the image resized for the model's 64-pixel input; width and height stay the original's.
    rh, rw = ImageFrame.for_image(good.size[1], good.size[0], 64).resized_size
    assert max(rh, rw) == 64 and len(out["pixels"][0]) == rh * rw * 3 and out["pixels"][1] == b""


def test_redaction_removes_userinfo_and_signed_query_values(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEY123")
    assert redact_text("InvalidAccessKeyId: AKIAEXAMPLEKEY123 unknown") == "InvalidAccessKeyId: REDACTED unknown"
    assert redact_uri("https://user:pw@host/a.jpg?X-Amz-Signature=abc&size=2") == \
        "https://host/a.jpg?X-Amz-Signature=REDACTED&size=2"
    assert redact_uri("s3://bucket/key.jpg") == "s3://bucket/key.jpg"
    assert redact_uri("/local/path.jpg") == "/local/path.jpg"
    assert redact_text("NoCredentialsError: failed GET https://k:s@h/x?sig=1 now") == \
        "NoCredentialsError: failed GET https://h/x?sig=REDACTED now"
    config = LabelConfig(input="s3://b/in", output="s3://b/out", endpoint_url="http://key:secret@minio:9000")
    assert "secret" not in json.dumps(config.public_dict())


def test_config_rejects_contradictions():
    with pytest.raises(ConfigError, match="--prompts"):
        LabelConfig(input="a", output="b", mode="box")
    with pytest.raises(ConfigError, match="--batch-size"):
        LabelConfig(input="a", output="b", batch_size=0)
    with pytest.raises(ConfigError, match="input folder itself"):
        LabelConfig(input="a/", output="a")


def test_model_calls_are_grouped_by_pixels():
    def image(side):  # groups count the original pixels, not those resized for the model
        frame = ImageFrame.for_image(side, side, 16)
        return ResizedImage(np.zeros((*frame.resized_size, 3), np.uint8), frame), None

    work = [image(2000), image(2000), image(2000), image(2000), image(5000), image(10)]  # 4 MP each, 25 MP
    sizes = [[item[0].frame.original_size[0] for item in group] for group in pixel_groups(work)]
    assert sizes == [[2000] * 4, [5000], [10]]
    assert sum(MAX_PIXELS_PER_MODEL_CALL >= sum(s * s for s in group) for group in sizes) == 2  # 5000² alone


def test_worker_plan_splits_the_cluster():
    config = LabelConfig(input="a", output="b")
    assert plan_workers(config, cpus=2, gpus=0) == WorkerPlan(1, 1, 0, 1)  # model 1 core, decode 1 core
    assert plan_workers(config, cpus=16, gpus=0) == WorkerPlan(1, 15, 0, 1)
    assert plan_workers(config, cpus=16, gpus=4) == WorkerPlan(4, 1, 1.0, 12, calls_per_worker=2)
    halves = dataclasses.replace(config, gpus_per_worker=0.5)
    assert plan_workers(halves, cpus=16, gpus=2) == WorkerPlan(4, 1, 0.5, 12, calls_per_worker=2)
    assert plan_workers(dataclasses.replace(config, workers=3), cpus=8, gpus=0) == WorkerPlan(3, 2, 0, 2)


def test_box_checks_clip_partial_boxes_and_name_bad_ones():
    clipped = checked_boxes(np.array([-5, 2, 50, 20], np.float32).tobytes(), width=40, height=30)
    assert clipped.tolist() == [[0, 2, 40, 20]]
    for flat, kind in (([], NO_PROMPTS), ([50, 50, 60, 60], PromptError.OUTSIDE_IMAGE), ([5, 5, 5, 9], PromptError.INVALID),
                       ([0, 0, np.nan, 3], PromptError.INVALID)):
        with pytest.raises(PromptCheckError) as caught:
            checked_boxes(np.array(flat, np.float32).tobytes(), width=40, height=30)
        assert caught.value.kind == kind


def test_prompts_from_coco_and_parquet(tmp_path):
    coco = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
            "annotations": [{"image_id": 1, "bbox": [1, 2, 3, 4]}, {"image_id": 1, "bbox": [0, 0, 5, 5]},
                            {"image_id": 2, "bbox": [10, 10, 1, 1]}]}
    (tmp_path / "p.json").write_text(json.dumps(coco))
    boxes = load_box_prompts(str(tmp_path / "p.json"))
    assert boxes["a.jpg"].tolist() == [[1, 2, 4, 6], [0, 0, 5, 5]] and boxes["b.jpg"].tolist() == [[10, 10, 11, 11]]
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": ["a.jpg"], "bbox": [[1.0, 2.0, 3.0, 4.0]]}), tmp_path / "p.parquet")
    assert load_box_prompts(str(tmp_path / "p.parquet"))["a.jpg"].tolist() == [[1, 2, 4, 6]]
    (tmp_path / "bad.json").write_text('{"images": []')
    with pytest.raises(PromptsFileError, match="not COCO JSON"):
        load_box_prompts(str(tmp_path / "bad.json"))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_publish_is_all_or_nothing(where, tmp_path, s3_server):
    prefix = str(tmp_path) if where == "local" else s3_server.make_bucket("publish-test") + "/out"
    fs, root = open_fs(prefix)
    with pytest.raises(RuntimeError):
        with open_for_publish(fs, f"{root}/x.json", "wt") as out:
            out.write("half")
            raise RuntimeError("killed while writing")
    assert not fs.exists(f"{root}/x.json")
    with open_for_publish(fs, f"{root}/x.json", "wt") as out:
        out.write("whole")
    assert fs.cat_file(f"{root}/x.json") == b"whole"
    fs.invalidate_cache()
    assert [p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)] == ["x.json"]  # no temp left behind


def _images_rows(uris: list[str]) -> pa.Table:
    return pa.table({"image_uri": uris, "width": [8] * len(uris), "height": [8] * len(uris),
                     "status": ["ok"] * len(uris), "error_kind": [None] * len(uris), "error": [None] * len(uris),
                     "num_annotations": [2] * len(uris)}, schema=IMAGES_SCHEMA)


def _committed_uris(store: OutputStore) -> set[str]:
    return set(store.read_table(IMAGES_DIR, columns=["image_uri"]).column("image_uri").to_pylist())


def test_recovery_rolls_committed_parts_forward_and_the_rest_back(tmp_path):
    import pyarrow.dataset as ds

    store = OutputStore(str(tmp_path / "out"))
    annotations = AnnotationColumns.empty()
    for uri in ("a.jpg", "b.jpg"):
        annotations.extend(AnnotationColumns.from_prediction(uri, random_prediction(0, 8, 8, 2), LABELS))
    store.write_part(_images_rows(["a.jpg", "b.jpg"]), annotations.to_table(), {"model": "test"})
    assert store.fs.find(store.path(STAGING_DIR)) == []  # nothing left once a part is published
    # Killed before the commit point: the annotations file staged, the images file not.
    orphan = AnnotationColumns.from_prediction("c.jpg", random_prediction(1, 8, 8, 2), LABELS).to_table()
    _put(store, store.path(STAGING_DIR, "killed", "annotations.parquet"), _parquet(orphan))
    _put(store, store.path(STAGING_DIR, "killed", ".images.parquet.123.tmp"), b"half")
    # Killed after the commit point, between the two moves: annotations published, images still staged.
    late = AnnotationColumns.from_prediction("d.jpg", random_prediction(2, 8, 8, 3), LABELS).to_table()
    _put(store, store.path(ANNOTATIONS_DIR, "part-late.parquet"), _parquet(late))
    _put(store, store.path(STAGING_DIR, "late", "images.parquet"), _parquet(_images_rows(["d.jpg"])))

    # Plain readers of a table folder never see an uncommitted row (the staged orphan of c.jpg).
    plain = ds.dataset(str(tmp_path / "out" / ANNOTATIONS_DIR)).to_table()
    assert "c.jpg" not in plain.column("image_uri").to_pylist()
    assert _committed_uris(store) == {"a.jpg", "b.jpg"}  # the one reader: parts whose images file is published

    assert store.recover() == Recovery(rolled_forward=1, rolled_back=1)
    assert _committed_uris(store) == {"a.jpg", "b.jpg", "d.jpg"}
    assert sorted(store.read_table(ANNOTATIONS_DIR).column("image_uri").to_pylist()) == (
        ["a.jpg"] * 2 + ["b.jpg"] * 2 + ["d.jpg"] * 3)
    assert store.fs.find(store.path(STAGING_DIR)) == []
    assert sorted(ds.dataset(str(tmp_path / "out" / IMAGES_DIR)).to_table().column("image_uri").to_pylist()) == [
        "a.jpg", "b.jpg", "d.jpg"]
    with pytest.raises(Exception, match="image_uri"):
        store.write_part(_images_rows(["e.jpg"]).drop_columns(["image_uri"]), annotations.to_table(), {})


def _put(store: OutputStore, path: str, data: bytes) -> None:
    store.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    store.fs.pipe(path, data)


def _parquet(table: pa.Table) -> bytes:
    import io

    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def test_output_and_input_may_not_contain_each_other(tmp_path):

    images = tmp_path / "images"
    nested = [(images, images / "out"), (images / "out" / "..", images / "labels"), (images / "sub", images),
              ("s3://b/in/", "s3://b/in/labels"), ("s3://b/in/**/*.jpg", "s3://b/in/out"), (images, f"{images}/")]
    for input_spec, output in nested:
        with pytest.raises(ConfigError, match="inside|itself|contain") as caught:
            LabelConfig(input=str(input_spec), output=str(output))
        assert "\n" not in str(caught.value)
    for input_spec, output in [("s3://b/in", "s3://b/input"), (images, tmp_path / "images-out"),
                               (tmp_path / "list.txt", tmp_path / "out")]:
        LabelConfig(input=str(input_spec), output=str(output))


def test_coco_export_is_sharded_beyond_the_line_and_every_shard_loads(tmp_path):
    from pycocotools.coco import COCO

    store = OutputStore(str(tmp_path / "out"))
    uris = [f"{i}.jpg" for i in range(7)]
    for part in (uris[:3], uris[3:]):  # two parts of 3 and 4 images: shards cut across parts
        annotations = AnnotationColumns.empty()
        for uri in part:
            annotations.extend(AnnotationColumns.from_prediction(uri, random_prediction(len(uri), 8, 8, 2), LABELS))
        store.write_part(_images_rows(part), annotations.to_table(), {})

    assert store.write_coco(list(LABELS), {}, shard_images=10) == ["coco.json"]
    assert len(COCO(store.path("coco.json")).imgs) == 7

    names = store.write_coco(list(LABELS), {}, shard_images=3)
    assert names == ["coco/part-00000.json", "coco/part-00001.json", "coco/part-00002.json"]
    assert not store.fs.exists(store.path("coco.json"))  # one export at a time
    shards = [COCO(store.path(name)) for name in names]
    assert [len(shard.imgs) for shard in shards] == [3, 3, 1]
    image_ids = [i for shard in shards for i in shard.imgs]
    assert sorted(image_ids) == list(range(1, 8))  # unique across shards
    assert sorted(img["file_name"] for shard in shards for img in shard.imgs.values()) == sorted(uris)
    for shard in shards:  # each shard holds exactly the annotations of its images
        assert len(shard.anns) == 2 * len(shard.imgs)
        assert all(ann["image_id"] in shard.imgs for ann in shard.anns.values())

    assert store.write_coco(list(LABELS), {}, shard_images=10) == ["coco.json"]
    assert not store.fs.exists(store.path("coco")) or store.fs.find(store.path("coco")) == []


def test_runtime_env_is_read_from_json_and_its_values_stay_out_of_run_json(tmp_path):
    from pipelines.config import load_runtime_env

    path = tmp_path / "env.json"
    path.write_text(json.dumps({"pip": ["ovsam-batch"], "env_vars": {"TOKEN": "s3cret"}}))
    config = LabelConfig(input="in", output="out", runtime_env=load_runtime_env(str(path)))
    assert config.runtime_env["pip"] == ["ovsam-batch"]
    assert config.public_dict()["runtime_env"] == ["env_vars", "pip"] and "s3cret" not in json.dumps(config.public_dict())
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        load_runtime_env(str(path))
    path.write_text("{nope")
    with pytest.raises(ConfigError, match="cannot read it as JSON"):
        load_runtime_env(str(path))


def test_model_actors_use_the_class_embeddings_the_driver_shipped(ray_cluster, tmp_path):
    """The driver embeds the vocabulary once (`ship_model`); a model actor labels with those embeddings, not its
    own: shipped embeddings of the classes in reverse order turn every label into its mirror."""
    import ray
    import torch

    import ovsam
    from pipelines.predict import CrashLedger, LabelImages, ShippedModel, ship_model

    model = ovsam.load_model("tiny", device="cpu")
    vocabulary = ovsam.Vocabulary.from_spec("circle,square,triangle,star")
    shipped = ship_model(model, vocabulary)
    reference = ovsam.Predictor(model, vocabulary).class_embeddings
    assert np.array_equal(shipped.class_embeddings, reference.numpy())
    config = LabelConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), mode="box", prompts="p.json",
                         preset="tiny")
    rng = np.random.default_rng(0)
    frame = ImageFrame.for_image(120, 160, model.config.image_size)
    pixels = rng.integers(0, 256, (*frame.resized_size, 3), dtype=np.uint8)
    batch = {"image_uri": np.array(["a.png"], dtype=object), "width": np.array([160], np.int32),
             "height": np.array([120], np.int32), "pixels": np.array([pixels.tobytes()], dtype=object),
             "error_kind": np.array([""], dtype=object), "error": np.array([""], dtype=object),
             "prompt_boxes": np.array([np.array([[5, 5, 80, 60], [60, 40, 150, 110]], np.float32).tobytes()],
                                      dtype=object)}
    labels = {}
    for name, embeddings in (("as shipped", shipped.class_embeddings),
                             ("reversed", shipped.class_embeddings[::-1].copy())):
        stage = LabelImages(config, vocabulary, ray.put(ShippedModel(shipped.files, embeddings)), 1,
                            ray.remote(num_cpus=0)(CrashLedger).remote())
        torch.testing.assert_close(stage.predictor.class_embeddings, torch.from_numpy(embeddings))
        out = stage(batch)
        assert list(out["status"]) == ["ok"], out["error"]
        labels[name] = deserialize(out["annotations"][0]).column("label_id").to_pylist()
    assert labels["reversed"] == [len(vocabulary) - 1 - i for i in labels["as shipped"]]


def test_model_stage_calls_running_at_once_give_the_rows_of_calls_one_after_another(ray_cluster, tmp_path):
    """A GPU model actor runs `MODEL_CALLS_PER_GPU_WORKER` batches at once, in threads: concurrent calls of one
    `LabelImages` give each batch exactly the rows it gets alone (no state shared between calls)."""
    from concurrent.futures import ThreadPoolExecutor

    import ray

    import ovsam
    from pipelines.label import MODEL_CALLS_PER_GPU_WORKER
    from pipelines.predict import CrashLedger, LabelImages, ship_model

    model = ovsam.load_model("tiny", device="cpu")
    vocabulary = ovsam.Vocabulary.from_spec("circle,square,triangle,star")
    config = LabelConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), mode="box", prompts="p.json",
                         preset="tiny")
    stage = LabelImages(config, vocabulary, ray.put(ship_model(model, vocabulary)), 1,
                        ray.remote(num_cpus=0)(CrashLedger).remote())
    rng = np.random.default_rng(5)

    def batch(index: int) -> dict:
        height, width = 100 + 20 * index, 180 - 10 * index
        frame = ImageFrame.for_image(height, width, model.config.image_size)
        boxes = np.array([[2, 3, width - 9, height // 2], [width // 3, 10, width - 1, height - 2]], np.float32)
        return {"image_uri": np.array([f"{index}.png"], dtype=object), "width": np.array([width], np.int32),
                "height": np.array([height], np.int32),
                "pixels": np.array([rng.integers(0, 256, (*frame.resized_size, 3), np.uint8).tobytes()], dtype=object),
                "error_kind": np.array([""], dtype=object), "error": np.array([""], dtype=object),
                "prompt_boxes": np.array([boxes[: 1 + index % 2].tobytes()], dtype=object)}

    batches = [batch(i) for i in range(3 * MODEL_CALLS_PER_GPU_WORKER)]
    alone = [stage(b) for b in batches]
    with ThreadPoolExecutor(MODEL_CALLS_PER_GPU_WORKER) as pool:
        together = list(pool.map(stage, batches))
    for one, other in zip(alone, together):
        assert list(one["status"]) == ["ok"] and list(other["status"]) == ["ok"], (one["error"], other["error"])
        assert deserialize(other["annotations"][0]).equals(deserialize(one["annotations"][0]))
    distinct = {str(deserialize(o["annotations"][0]).column("bbox").to_pylist()) for o in alone}
    assert len(distinct) == len(alone)  # the batches' rows differ, so a mix-up between the threads would show


def test_the_input_decode_and_writer_workers_do_not_import_the_model_libraries():
    # Each of these stages is a fresh process per run: importing open_clip, segment_anything and torchvision
    # there would add seconds of start-up to every run.
    import subprocess
    import sys

    code = ("import sys, pipelines.inputs, pipelines.decode, pipelines.output; "
            "print(','.join(m for m in ('open_clip', 'segment_anything', 'torchvision') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
