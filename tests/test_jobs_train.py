"""The Ray Train jobs for real: 2 CPU workers (gloo) on the session's local Ray, S3 on the loopback server.

* SAM2CLIP: teacher embeddings precomputed by the Ray Data step into S3 (a zero-byte image becomes an error
  entry), then 2-worker distillation with data and checkpoints on S3; the loss goes down and the exported
  adapter is closer to the teacher than the one it started from.
* CLIP2SAM: 2-worker training in which worker 1 dies at the start of epoch 1; Ray Train restarts the group,
  training resumes from epoch 0's checkpoint (not from scratch), the loss goes down, and the checkpoint
  loads into the labeller both as a model directory and as a release-layout ``--weights clip2sam=`` file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
import time

import fsspec
import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file

from click.testing import CliRunner
from ray import cloudpickle

import ovsam
from jobs import clip2sam, common, losses, sam2clip, shapes, teacher
from jobs.data import DataError, read_embedding, read_image
from ovsam.transforms import preprocess
from ovsam_batch.cli import main as cli

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray Train workers need not import the tests package

# Small enough for a few CPU steps, large enough for the adapter's 8-token attention windows (128 / 16).
IMAGE_SIZE = 128
TEACHER = teacher.TeacherConfig(image_size=IMAGE_SIZE, embed_dim=32, depth=1, num_heads=2, global_attn_indexes=(0,),
                                window_size=4, out_channels=128, seed=1)
# A learning rate high enough for the loss to drop visibly within a handful of steps.
TEST_LR = 1e-3


def _small_preset(directory: pathlib.Path) -> str:
    config, _ = ovsam.load_config("tiny")
    path = directory / "tiny_small.json"
    path.write_text(json.dumps(dataclasses.replace(config, name="tiny_small", image_size=IMAGE_SIZE).to_dict()))
    return str(path)


def _shapes(directory: pathlib.Path, num_images: int, seed: int) -> pathlib.Path:
    return shapes.generate(shapes.ShapesConfig(str(directory), num_images=num_images, seed=seed, min_side=IMAGE_SIZE, max_side=IMAGE_SIZE,
                                               max_objects=3))


def _losses_by_epoch(result) -> list[float]:
    frame = result.metrics_dataframe.sort_values("epoch")
    return frame["loss"].tolist()


def test_precompute_redoes_a_truncated_embedding(ray_cluster, tmp_path):
    """A .npy cut short (by a kill, or a tool that wrote in place) is embedded again on resume, not kept."""
    _shapes(tmp_path / "data", num_images=3, seed=12)
    config = teacher.PrecomputeConfig(str(tmp_path / "data" / "images"), str(tmp_path / "teacher"), TEACHER, batch_size=4)
    assert teacher.precompute(config)["written"] == 3
    embeddings = sorted((tmp_path / "teacher").glob("*.npy"))
    whole = read_embedding(str(embeddings[0]))
    embeddings[0].write_bytes(embeddings[0].read_bytes()[:-100])
    again = teacher.precompute(config)
    assert (again["written"], again["existing"]) == (1, 2)
    # Embedded again (alone in its batch now, so equal up to float16 rounding of a different summation order).
    np.testing.assert_allclose(read_embedding(str(embeddings[0])), whole, atol=2e-2)
    assert sorted(path.name for path in (tmp_path / "teacher").iterdir()) == sorted(
        [path.name for path in embeddings] + [teacher.MANIFEST_FILE])  # no temp files left


@pytest.mark.slow
def test_sam2clip_on_s3_with_two_workers(ray_cluster, s3_server, tmp_path):
    bucket = s3_server.make_bucket("sam2clip-test")
    _shapes(tmp_path / "data", num_images=8, seed=11)
    fs = fsspec.filesystem("s3")
    fs.put(str(tmp_path / "data" / "images") + "/", f"{bucket}/images/", recursive=True)
    fs.pipe(f"{bucket}/images/broken.jpg", b"")  # a zero-byte upload

    manifest = teacher.precompute(teacher.PrecomputeConfig(f"{bucket}/images", f"{bucket}/teacher", TEACHER, batch_size=4))
    assert manifest["written"] == 8
    assert [e["path"] for e in manifest["errors"]] == ["broken.jpg"] and "empty" in manifest["errors"][0]["error"]
    # Re-running skips what exists.
    again = teacher.precompute(teacher.PrecomputeConfig(f"{bucket}/images", f"{bucket}/teacher", TEACHER, batch_size=4))
    assert (again["written"], again["existing"]) == (0, 8)

    preset = _small_preset(tmp_path)
    settings = common.RunSettings(storage=f"{bucket}/runs", name="distil", epochs=2, batch_size=2, lr=TEST_LR,
                                  num_workers=2, max_failures=0, export=str(tmp_path / "export"))
    result = sam2clip.run(sam2clip.Sam2ClipJob(preset, f"{bucket}/images", f"{bucket}/teacher", loader_workers=0), settings)

    first, last = _losses_by_epoch(result)
    assert last < first
    assert result.metrics["images"] == 8  # both workers' shards, all-reduced
    assert result.checkpoint.path.startswith("sam2clip-test/runs/distil/")
    with fsspec.open(f"s3://{result.checkpoint.path}/sam2clip.safetensors", "rb") as handle:
        keys = list(load_safetensors_bytes(handle.read()))
    assert keys and all(key.startswith("neck_student.") for key in keys)

    # The exported adapter reproduces the teacher better than the one it started from.
    image = read_image(str(tmp_path / "data" / "images" / "shapes_000000.jpg"))
    target = torch.from_numpy(read_embedding(f"{bucket}/teacher/shapes_000000.jpg.npy").astype(np.float32))
    pixels = preprocess(image, IMAGE_SIZE)[0][None]
    errors = []
    for spec in (preset, str(tmp_path / "export")):
        model = ovsam.load_model(spec, device="cpu")
        with torch.no_grad():
            errors.append(torch.nn.functional.mse_loss(model.embed_image(pixels).embedding[0], target).item())
    assert errors[1] < errors[0]


# Seconds the killed worker waits after its report: Ray Train's controller collects reports by polling the workers
# (every 2 s by default), and a worker that dies sooner may take that report's checkpoint with it.
_REPORT_COLLECTED_S = 5.0


def _dies_once_after_its_first_report(loop, marker: str):
    """``loop`` (a Ray Train per-worker loop) whose worker of rank 1 exits abruptly, once (``marker`` records it),
    right after reporting its first epoch: the crash comes from the test, not from the job's code."""

    def loop_that_dies(loop_config: dict) -> None:
        import ray.train

        report = ray.train.report

        def report_then_die(metrics, *args, **kwargs):
            report(metrics, *args, **kwargs)
            if ray.train.get_context().get_world_rank() == 1 and not os.path.exists(marker):
                pathlib.Path(marker).touch()
                time.sleep(_REPORT_COLLECTED_S)
                os._exit(1)

        ray.train.report = report_then_die  # in this worker process only
        loop(loop_config)

    return loop_that_dies


@pytest.mark.slow
def test_clip2sam_resumes_after_a_worker_dies(ray_cluster, tmp_path, monkeypatch):
    annotations = _shapes(tmp_path / "data", num_images=12, seed=12)
    preset = _small_preset(tmp_path)
    marker = tmp_path / "worker-1-died"
    monkeypatch.setattr(clip2sam, "train_loop", _dies_once_after_its_first_report(clip2sam.train_loop, str(marker)))
    settings = common.RunSettings(storage=str(tmp_path / "runs"), name="c2s", epochs=2, batch_size=2, lr=TEST_LR,
                                  num_workers=2, max_failures=1, export=str(tmp_path / "export"))
    job = clip2sam.Clip2SamJob(preset, str(annotations), str(tmp_path / "data" / "images"), num_points=512,
                               loader_workers=0)
    result = clip2sam.run(job, settings)

    assert marker.exists(), "worker 1 should have died once"
    # The restarted group continued at epoch 1 from epoch 0's checkpoint instead of starting over.
    assert (result.metrics["epoch"], result.metrics["started_at_epoch"]) == (1, 1)
    first, last = _losses_by_epoch(result)
    assert last < first

    export = tmp_path / "export"
    keys = load_file(str(export / "clip2sam.safetensors"))
    assert {key.split(".")[0] for key in keys} == {"fpn_neck", "mask_decoder"}
    trained = ovsam.load_model(export, device="cpu")
    assert trained.config.trained and trained.config.vocabulary == ",".join(shapes.SHAPE_CLASSES)
    assert trained.config.seen_classes == tuple(shapes.SHAPE_CLASSES)
    # Named after the run and its parent (the restart resumed the renamed model, and did not rename it again).
    assert trained.config.name == "c2s"
    assert trained.config.description == f"c2s (fine-tuned from {ovsam.load_config(preset)[0].name} by clip2sam)"
    # The release-layout file alone, given as --weights clip2sam=..., loads into the starting preset.
    as_weights = ovsam.load_model(preset, weights={"clip2sam": str(export / "clip2sam.safetensors")}, device="cpu")
    untrained = ovsam.load_model(preset, device="cpu")

    image = read_image(str(tmp_path / "data" / "images" / "shapes_000000.jpg"))
    boxes = np.array([[10, 10, 70, 70], [40, 30, 120, 100]], np.float32)
    vocabulary = ovsam.Vocabulary.from_spec(trained.config.vocabulary)
    predictions = []
    for model in (trained, as_weights, untrained):
        predictor = ovsam.Predictor(model, vocabulary)
        predictor.set_image(image)
        predictions.append(predictor.predict(boxes=boxes))
    assert np.array_equal(predictions[0].masks, predictions[1].masks)
    assert np.allclose(predictions[0].topk_probs, predictions[1].topk_probs)
    assert not np.allclose(predictions[0].topk_probs, predictions[2].topk_probs)


def test_bad_inputs_fail_before_training_in_plain_words(tmp_path):
    preset = _small_preset(tmp_path)
    settings = common.RunSettings(storage=str(tmp_path / "runs"), name="x")
    with pytest.raises(DataError, match="does not exist"):
        clip2sam.run(clip2sam.Clip2SamJob(preset, str(tmp_path / "missing.json"), str(tmp_path)), settings)
    (tmp_path / "cats.json").write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "cat"}]}))
    with pytest.raises(common.JobError, match="not in vocabulary"):
        clip2sam.run(clip2sam.Clip2SamJob(preset, str(tmp_path / "cats.json"), str(tmp_path), vocabulary="dog,bird"), settings)
    with pytest.raises(DataError, match="needs its SAM checkpoint"):
        teacher.TeacherConfig.from_spec("vit_h", None)
    with pytest.raises(common.JobError, match="epochs"):
        common.RunSettings(storage="x", name="y", epochs=0)


def test_commands_report_bad_input_without_a_traceback(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["train", "clip2sam", "--preset", "tiny", "--annotations", str(tmp_path / "none.json"),
                                 "--images", str(tmp_path), "--storage", str(tmp_path / "runs"), "--name", "x"])
    assert result.exit_code != 0 and "none.json does not exist" in result.output and "Traceback" not in result.output
    result = runner.invoke(cli, ["train", "sam2clip", "--preset", "tiny", "--images", str(tmp_path),
                                 "--embeddings", str(tmp_path / "emb"), "--storage", str(tmp_path / "runs"), "--name", "x"])
    assert result.exit_code != 0 and "precompute-teacher" in result.output
    result = runner.invoke(cli, ["train", "precompute-teacher", "--images", str(tmp_path / "none"),
                                 "--embeddings", str(tmp_path / "emb"), "--teacher", "vit_b"])
    assert result.exit_code != 0 and "needs its SAM checkpoint" in result.output


def test_learning_rate_steps_scale_with_the_epoch_count():
    assert common.milestones(12) == [8, 11]
    assert common.milestones(24) == [16, 22]
    assert common.milestones(3) == [2]


@pytest.mark.parametrize("train_adapter, train_clip_image", [(False, False), (True, True)])
def test_clip2sam_step_trains_exactly_the_chosen_parts(tmp_path, train_adapter, train_clip_image):
    """The release trains FPN + head; the options add the adapter and CLIP's image tower. Frozen parts get
    no gradient, trained parts do."""
    from jobs.data import CocoInstances, collate_instances, load_coco

    annotations = _shapes(tmp_path, num_images=2, seed=13)
    model = ovsam.load_model(_small_preset(tmp_path), device="cpu").train()
    model.requires_grad_(True)
    dataset = CocoInstances(load_coco(str(annotations)), str(tmp_path / "images"), IMAGE_SIZE, max_instances=3, seed=0)
    batch = collate_instances([dataset[0], dataset[1]])
    job = clip2sam.Clip2SamJob("unused", "", "", num_points=256, train_adapter=train_adapter,
                               train_clip_image=train_clip_image)
    class_embeddings = torch.nn.functional.normalize(torch.randn(len(shapes.SHAPE_CLASSES), 1, model.clip.embed_dim), dim=-1)
    step = clip2sam._Step(model, class_embeddings, job)
    clip2sam.total_loss(step(batch)).backward()

    def has_grad(module: torch.nn.Module) -> bool:
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    assert has_grad(model.fpn) and has_grad(model.head.mask_decoder) and has_grad(model.head.roi_conv)
    assert has_grad(model.sam2clip) == train_adapter
    assert has_grad(model.clip.model.visual) == train_clip_image
    assert not has_grad(model.prompt_encoder)


def test_frozen_parts_keep_their_batch_norm_statistics(tmp_path):
    """CLIP's ResNet has BatchNorm: frozen, it must stay in eval mode, or its running statistics drift with
    every training batch although no weight is trained."""
    model = ovsam.load_model(_small_preset(tmp_path), device="cpu")
    params = common.train_only(model, [model.fpn])
    assert params and all(p.requires_grad for p in params)
    assert model.fpn.training and not model.clip.training
    norms = [m for m in model.clip.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in norms]
    model.clip.features(torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE) * 3 + 1)
    assert norms and all(torch.equal(m.running_mean, b) for m, b in zip(norms, before))
    assert not any(p.requires_grad for p in model.clip.parameters())


def test_shapes_clip_pretraining_step_labels_cells_and_trains_both_towers(tmp_path):
    """The recipe's CLIP pre-training: every stride-8 cell mostly covered by a shape is labelled with that
    shape's class (the rest background), and the loss reaches the image and the text tower."""
    from jobs.data import CocoInstances, collate_instances, load_coco
    from jobs.recipes import shapes_clip

    annotations = _shapes(tmp_path, num_images=2, seed=14)
    model = ovsam.load_model(_small_preset(tmp_path), device="cpu")
    dataset = CocoInstances(load_coco(str(annotations)), str(tmp_path / "images"), IMAGE_SIZE, max_instances=3, seed=0)
    batch = collate_instances([dataset[0], dataset[1]])
    vocabulary = ovsam.Vocabulary.from_spec(",".join(shapes.SHAPE_CLASSES))
    step = shapes_clip._Step(model.clip, vocabulary)
    common.train_only(model, [model.clip.model])
    out = step(batch)

    cells = IMAGE_SIZE // shapes_clip.DENSE_STRIDE
    expected = np.full((2, cells, cells), len(shapes.SHAPE_CLASSES))
    for mask, image, label in zip(batch["masks"].numpy(), batch["image_index"].numpy(), batch["labels"].numpy()):
        cover = mask.reshape(cells, shapes_clip.DENSE_STRIDE, cells, shapes_clip.DENSE_STRIDE).mean((1, 3))
        expected[image][cover > 0.5] = label
    assert (expected < len(shapes.SHAPE_CLASSES)).any()
    assert np.array_equal(out["dense_targets"].numpy(), expected.reshape(-1))
    assert out["region_logits"].shape == (len(batch["labels"]), len(shapes.SHAPE_CLASSES) + 1)

    (losses.classification_loss(out["region_logits"], batch["labels"])
     + losses.classification_loss(out["dense_logits"], out["dense_targets"])).backward()
    assert model.clip.model.visual.conv1.weight.grad.abs().sum() > 0
    assert model.clip.model.token_embedding.weight.grad.abs().sum() > 0


def test_clip2sam_prompts_follow_the_release_and_background_points_fall_on_no_object(tmp_path):
    """Release sampling (instances repeated up to max_instances, half box / half random point inside the mask)
    plus the background option: points on no object inside the image, background label, empty mask."""
    from jobs.data import CocoInstances, collate_instances, load_coco

    annotations = _shapes(tmp_path, num_images=3, seed=15)
    coco = load_coco(str(annotations))
    dataset = CocoInstances(coco, str(tmp_path / "images"), IMAGE_SIZE, max_instances=10, seed=0, replicate=True,
                            background_points=0.5)
    background_label = len(shapes.SHAPE_CLASSES)
    for item in (dataset[i] for i in range(len(dataset))):
        objects = ~item["is_background"]
        assert objects.sum() == 10 and item["is_background"].sum() == 5
        assert abs(int(item["is_box"][objects].sum()) - 5) <= 0 and not item["is_box"][item["is_background"]].any()
        union = item["masks"][objects].amax(0).bool()
        for point, mask, is_background, label in zip(item["points"].long(), item["masks"], item["is_background"],
                                                     item["labels"]):
            x, y = point.tolist()
            if is_background:
                assert label == background_label and not mask.any() and not union[y, x]
            else:
                assert label < background_label and mask[y, x]
    release = CocoInstances(coco, str(tmp_path / "images"), IMAGE_SIZE, max_instances=10, seed=0)
    assert not release[0]["is_background"].any() and len(release[0]["labels"]) <= 3

    model = ovsam.load_model(_small_preset(tmp_path), device="cpu").train()
    job = clip2sam.Clip2SamJob("unused", "", "", num_points=256, background_points=0.5)
    class_embeddings = torch.nn.functional.normalize(torch.randn(len(shapes.SHAPE_CLASSES), 1, model.clip.embed_dim), dim=-1)
    parts = clip2sam._Step(model, class_embeddings, job)(collate_instances([dataset[0], dataset[1]]))
    assert all(torch.isfinite(value) for value in parts.values())
    assert 0 <= parts["background_recall"] <= 1

