"""A model worker killed by an input (SIGKILL, as the kernel's OOM killer does): restarted, its batch given again
a bounded number of times, the image that kills it every time ends as a `model_error` row, the run goes on."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import warnings

import pytest
from ray import cloudpickle
from ray.util.annotations import RayDeprecationWarning

import pipelines.label
import pipelines.predict
from pipelines.config import LabelConfig
from pipelines.label import run_label
from pipelines.output import OutputStore
from pipelines.predict import MAX_WORKER_DEATHS, MODEL_ERROR, LabelImages
from schemas.tables import IMAGES_DIR, STATUS_OK
from tests.pipeline_cases import shapes_image

# The image size that kills the worker (height, width); no other test image has it.
POISON_SIZE = (37, 53)

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers need not import the tests package


def _die_on_poison(images) -> None:
    """`images`: what the model stage gives the model (`ovsam.transforms.ResizedImage`, original size in its frame)."""
    if any(image.frame.original_size == POISON_SIZE for image in images):
        os.kill(os.getpid(), signal.SIGKILL)


class CrashingModelStage(LabelImages):
    """The real model stage, whose process is killed whenever its model is given an image of POISON_SIZE."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        predict_images, set_image = self.predictor.predict_images, self.predictor.set_image

        def guarded_predict_images(images, boxes):
            _die_on_poison(images)
            return predict_images(images, boxes)

        def guarded_set_image(image):
            _die_on_poison([image])
            return set_image(image)

        self.predictor.predict_images, self.predictor.set_image = guarded_predict_images, guarded_set_image


class CrashingWhileEncoding(LabelImages):
    """The real model stage, whose process is killed whenever it encodes the masks of ``img_2.jpg``: after the
    model call, where no per-image crash count covers it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        columns = pipelines.predict.AnnotationColumns

        class KilledOnPoison(columns):
            @classmethod
            def from_prediction(cls, uri, *args, **kwargs):
                if uri.endswith("/img_2.jpg"):
                    os.kill(os.getpid(), signal.SIGKILL)
                return super().from_prediction(uri, *args, **kwargs)

        pipelines.predict.AnnotationColumns = KilledOnPoison  # in this worker process only


def _poison_inputs(tmp_path) -> tuple[list[str], LabelConfig]:
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    names = [f"img_{index}.jpg" for index in range(6)]
    for index, name in enumerate(names):
        height, width = POISON_SIZE if name == "img_2.jpg" else (40, 60)
        shapes_image(index, width, height).save(images_dir / name)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"images": [{"id": i, "file_name": n} for i, n in enumerate(names)],
                                   "annotations": [{"id": i, "image_id": i, "bbox": [2, 2, 20, 20]}
                                                   for i in range(len(names))]}))
    return names, LabelConfig(input=str(images_dir), output=str(tmp_path / "out"), mode="box", prompts=str(prompts),
                              batch_size=3)


@pytest.mark.slow
def test_an_image_that_kills_the_worker_every_time_ends_as_an_error_row(ray_cluster, tmp_path, monkeypatch):
    names, config = _poison_inputs(tmp_path)
    monkeypatch.setattr(pipelines.label, "LabelImages", CrashingModelStage)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RayDeprecationWarning)
        summary = run_label(config, show_progress=False)
    assert not [w for w in caught if issubclass(w.category, RayDeprecationWarning)], [str(w.message) for w in caught]

    rows = {row["image_uri"].rsplit("/", 1)[-1]: row for row in OutputStore(config.output).read_table(IMAGES_DIR).to_pylist()}
    assert sorted(rows) == names
    poison = rows.pop("img_2.jpg")
    assert poison["error_kind"] == MODEL_ERROR and f"died each time" in poison["error"]
    assert f"{MAX_WORKER_DEATHS} times" in poison["error"]
    assert all(row["status"] == STATUS_OK for row in rows.values())  # its batch neighbours were labelled
    assert summary.run_errors == {MODEL_ERROR: 1}


@pytest.mark.slow
def test_a_batch_whose_worker_dies_outside_the_model_call_every_time_ends_as_error_rows(ray_cluster, tmp_path,
                                                                                        monkeypatch):
    names, config = _poison_inputs(tmp_path)
    config = dataclasses.replace(config, batch_size=1)  # the fewest deaths before the batch is given up
    monkeypatch.setattr(pipelines.label, "LabelImages", CrashingWhileEncoding)
    summary = run_label(config, show_progress=False)

    rows = {row["image_uri"].rsplit("/", 1)[-1]: row for row in OutputStore(config.output).read_table(IMAGES_DIR).to_pylist()}
    assert sorted(rows) == names
    poison = rows.pop("img_2.jpg")
    assert poison["error_kind"] == MODEL_ERROR and "died 4 times while labelling the batch" in poison["error"]
    assert all(row["status"] == STATUS_OK for row in rows.values())
    assert summary.run_errors == {MODEL_ERROR: 1}
