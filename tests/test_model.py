"""The model package as a user meets it: presets, loading errors, saving, prompted and automatic prediction."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

import ovsam
from ovsam.config import ConfigError
from tests.golden import golden_dir, read_golden


@pytest.fixture(scope="module")
def tiny():
    return ovsam.load_model("tiny", device="cpu")


@pytest.fixture(scope="module")
def predictor(tiny, tmp_path_factory):
    return ovsam.Predictor(tiny, ovsam.Vocabulary.from_spec("circle,square,triangle"),
                           cache_dir=tmp_path_factory.mktemp("vocab"))


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)


def test_presets_are_listed_and_tiny_is_marked_untrained(tiny):
    assert {"tiny", "coco_rn50x16", "lvis_rn50x16"} <= set(ovsam.preset_names())
    assert tiny.config.trained is False
    assert ovsam.load_config("coco_rn50x16")[0].trained is True


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="unknown model preset 'nope'.*tiny"):
        ovsam.load_model("nope")


@pytest.mark.parametrize("section, field, value, named", [
    ("adapter", "embed_dim", -64, "adapter.embed_dim"),
    ("adapter", "embed_dim", 10**9, "adapter.embed_dim"),
    ("adapter", "depth", "2", "adapter.depth"),
    ("adapter", "num_heads", 3, "adapter.num_heads"),  # 64 is not divisible by 3
    ("adapter", "global_attn_indexes", [7], "adapter.global_attn_indexes"),
    ("decoder", "dim", 0, "decoder.dim"),
    ("decoder", "mlp_dim", 10**7, "decoder.mlp_dim"),
    ("fusion", "alpha", 1.5, "fusion.alpha"),
    ("clip", "arch", "RN5O", "clip.arch"),
    (None, "image_size", 100, "image_size"),
    (None, "image_size", 65536, "image_size"),
    (None, "seen_classes", "cat", "seen_classes"),
])
def test_a_bad_model_config_is_refused_naming_the_field(tmp_path, section, field, value, named):
    """Absurd or inconsistent dimensions are refused where the config enters, before anything is allocated."""
    config = json.loads((ovsam.config.PRESET_DIR / "tiny.json").read_text())
    if section == "clip":
        config["clip"] = {"arch": value}
    elif section is None:
        config[field] = value
    else:
        config[section][field] = value
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError) as caught:
        ovsam.load_model(str(path), device="cpu")
    message = str(caught.value)
    assert message.startswith(f"model config {path}: ") and named in message and "\n" not in message


def test_a_release_sized_model_config_is_accepted():
    for name in ("coco_rn50x16", "lvis_rn50x16", "tiny", "shapes"):
        ovsam.load_config(name)


def test_missing_weight_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "clip2sam_coco_rn50x16.pth"
    with pytest.raises(ovsam.WeightsError, match="clip2sam_coco_rn50x16.pth"):
        ovsam.load_model("tiny", weights={"clip2sam": str(missing)})


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    broken = tmp_path / "sam2clip.pth"
    broken.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ovsam.WeightsError, match="not a readable checkpoint"):
        ovsam.load_model("tiny", weights={"sam2clip": str(broken)})


def test_weights_of_another_configuration_list_the_mismatches():
    golden = read_golden(golden_dir())
    with pytest.raises(ovsam.WeightsError) as caught:
        ovsam.load_model("tiny", weights={"clip2sam": golden.weights["clip2sam"]})
    message = str(caught.value)
    assert "clip2sam" in message and "shape" in message
    assert "fpn_neck" in message and "lateral_convs.0.conv.weight: file [256,32,1,1] vs model [128,64,1,1]" in message


def test_saved_model_directory_loads_and_predicts_the_same(tiny, tmp_path, image):
    directory = ovsam.save_model(tiny, tmp_path / "model", vocabulary="circle,square")
    config = json.loads((directory / "ovsam_config.json").read_text())
    assert config["vocabulary"] == "circle,square" and config["trained"] is False
    reloaded = ovsam.load_model(directory, device="cpu")
    for role, state in ovsam.release_state_dicts(tiny).items():
        again = ovsam.release_state_dicts(reloaded)[role]
        assert state.keys() == again.keys()
        assert all(torch.equal(state[k], again[k]) for k in state)
    # Half-precision storage loads into the float32 model.
    half = ovsam.save_model(tiny, tmp_path / "half", dtype=torch.float16)
    ovsam.load_model(half, device="cpu")


def test_predictor_fuses_with_the_seen_classes_of_the_weights(tiny, tmp_path):
    import dataclasses

    trained_on_circles = dataclasses.replace(tiny.config, seen_classes=("circle", "star"))
    model = ovsam.OVSAM(trained_on_circles)
    vocabulary = ovsam.Vocabulary.from_spec("square,Circle,triangle")
    predictor = ovsam.Predictor(model, vocabulary, cache_dir=tmp_path)
    assert predictor.seen.tolist() == [False, True, False]


def test_box_prompts_give_one_object_each(predictor, image):
    predictor.set_image(image)
    boxes = np.array([[10, 20, 110, 120], [150, 40, 300, 230]], np.float32)
    prediction = predictor.predict(boxes=boxes)
    assert len(prediction) == 2
    assert prediction.masks.shape == (2, 240, 320) and prediction.masks.dtype == bool
    assert prediction.prompt_type == "box"
    np.testing.assert_array_equal(prediction.prompts, boxes)
    assert prediction.topk_ids.shape == (2, 3)
    np.testing.assert_array_equal(prediction.label_ids, prediction.topk_ids[:, 0])
    assert np.all(np.diff(prediction.topk_probs, axis=1) <= 0)
    total = prediction.topk_probs.sum(1) + prediction.background_probs
    np.testing.assert_allclose(total, 1.0, atol=1e-5)  # all 3 classes + background


def test_no_prompts_give_an_empty_prediction(predictor, image):
    """An image without boxes or points has no object: an empty prediction with every field shaped, no error."""
    predictor.set_image(image)
    for prompts in ({"boxes": np.zeros((0, 4), np.float32)}, {"points": np.zeros((0, 1, 2), np.float32)}):
        prediction = predictor.predict(**prompts)
        assert len(prediction) == 0
        assert prediction.masks.shape == (0, 240, 320) and prediction.boxes.shape == (0, 4)
        assert prediction.topk_ids.shape == (0, 3) and prediction.run_lengths() == []


def test_masks_boxes_and_run_lengths_computed_on_the_device_agree(predictor, image):
    """The three views of a prediction's masks (host masks, boxes, COCO run lengths) are one set of masks."""
    import pycocotools.mask as mask_utils

    from schemas.annotations import compress_run_lengths
    predictor.set_image(image)
    prediction = predictor.predict(boxes=np.array([[10, 20, 110, 120], [150, 40, 300, 230], [0, 0, 320, 240]],
                                                  np.float32))
    assert prediction.low_res_masks.device == predictor.model.device and prediction.image_size == (240, 320)
    masks = prediction.masks
    assert masks.any()
    expected = mask_utils.encode(np.asfortranarray(np.moveaxis(masks.astype(np.uint8), 0, -1)))
    assert [r["counts"] for r in compress_run_lengths(prediction.run_lengths(), 240, 320)] == \
        [r["counts"] for r in expected]
    for mask, box in zip(masks, prediction.boxes):
        ys, xs = np.nonzero(mask)
        expected_box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] if mask.any() else [0, 0, 0, 0]
        np.testing.assert_array_equal(box, expected_box)


def test_prompts_outside_the_image_raise_prompt_error(predictor, image):
    predictor.set_image(image)
    with pytest.raises(ovsam.PromptError, match="outside the 320x240 image"):
        predictor.predict(boxes=np.array([[400, 300, 500, 400]], np.float32))
    with pytest.raises(ovsam.PromptError, match="empty or not finite"):
        predictor.predict(boxes=np.array([[50, 50, 40, 80]], np.float32))
    with pytest.raises(ovsam.PromptError, match="outside"):
        predictor.predict(points=np.array([[[-5, 10]]], np.float32))


def test_batched_images_match_one_at_a_time(predictor, image):
    other = np.ascontiguousarray(image[::-1, :, :])
    boxes = [np.array([[10, 20, 110, 120]], np.float32), np.array([[30, 30, 200, 200], [5, 5, 50, 60]], np.float32)]
    batched = predictor.predict_images([image, other], boxes)
    for img, img_boxes, result in zip([image, other], boxes, batched):
        predictor.set_image(img)
        single = predictor.predict(boxes=img_boxes)
        np.testing.assert_array_equal(result.masks, single.masks)
        np.testing.assert_allclose(result.topk_probs, single.topk_probs, atol=1e-5)


@pytest.mark.slow
def test_compiled_image_encoder_embeds_as_the_eager_one(predictor, image):
    compiled = ovsam.Predictor(predictor.model, predictor.vocabulary, class_embeddings=predictor.class_embeddings,
                               compile_encoder=True)
    images = [image, np.ascontiguousarray(image[::-1])]
    for batch in (images, images[:1]):  # a second batch size compiles once more, then runs
        expected, _ = predictor.embed_images(batch)
        got, _ = compiled.embed_images(batch)
        for want, have in zip([*expected.clip_maps, expected.embedding, *expected.fpn_maps],
                              [*got.clip_maps, got.embedding, *got.fpn_maps], strict=True):
            torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-4)


def test_an_encoder_that_cannot_be_compiled_runs_eagerly_with_a_warning(predictor, image, monkeypatch):
    def no_compiler(graph, example_inputs):
        raise RuntimeError("no working C++ compiler found")

    compile_with = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn: compile_with(fn, backend=no_compiler))
    fallback = ovsam.Predictor(predictor.model, predictor.vocabulary, class_embeddings=predictor.class_embeddings,
                               compile_encoder=True)
    with pytest.warns(RuntimeWarning, match="running it eagerly: RuntimeError: no working C"):
        got, _ = fallback.embed_images([image])
    expected, _ = predictor.embed_images([image])
    torch.testing.assert_close(got.embedding, expected.embedding)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second try, so no second warning
        got, _ = fallback.embed_images([image])
    torch.testing.assert_close(got.embedding, expected.embedding)


def test_point_prompts_take_clip_regions_from_the_masks(tiny, predictor, image):
    """Point prompts have no box: CLIP must see the predicted mask's box, not a prompt box."""
    predictor.set_image(image)
    points = np.array([[[60, 70]], [[200, 100]]], np.float32)
    features, frames = predictor.embed_images([image])
    decoded = predictor.decode(features, frames[0], 0, points, "point")
    torch.testing.assert_close(decoded.region_boxes, decoded.mask_boxes)


def test_automatic_mode_outputs_respect_its_filters(predictor, image):
    config = ovsam.AutomaticConfig(points_per_side=6, stability=0.0, max_background=1.0, nms_iou=0.5,
                                   min_area=50, max_objects=10)
    prediction = ovsam.AutomaticLabeller(predictor, config).generate(image)
    assert prediction.prompt_type == "grid"
    assert 1 <= len(prediction) <= 10
    assert prediction.prompts.shape == (len(prediction), 2)
    masks = torch.from_numpy(prediction.masks).flatten(1).float()
    areas = masks.sum(dim=1)
    assert float(areas.min()) >= 50  # at the resolution the masks are stored at
    inter = masks @ masks.T
    iou = (inter / (areas[:, None] + areas[None, :] - inter)).fill_diagonal_(0)
    # NMS runs on the low-resolution masks; at full resolution the overlap can differ by boundary pixels.
    assert float(iou.max()) <= 0.55
    strict = ovsam.AutomaticLabeller(predictor, ovsam.AutomaticConfig(points_per_side=6, max_background=0.0))
    assert len(strict.generate(image)) == 0  # nothing is certainly an object: everything is filtered


def test_mask_nms_drops_duplicates_and_fragments_keeps_separate_objects():
    from ovsam.automatic import mask_nms
    masks = torch.zeros(4, 20, 20, dtype=torch.bool)
    masks[0, 2:12, 2:12] = True  # best: an object
    masks[1, 3:13, 2:12] = True  # a near-duplicate of it (IoU 0.82, 90 % inside it)
    masks[2, 4:8, 4:8] = True  # a fragment inside it (IoU 0.16, fully covered)
    masks[3, 12:18, 12:18] = True  # a separate object
    assert mask_nms(masks, 0.5).tolist() == [0, 3]
    assert mask_nms(masks, 0.95).tolist() == [0, 1, 3]  # the fragment is still inside more than 95 %


def test_automatic_config_names_the_bad_setting():
    with pytest.raises(ValueError, match="min_area"):
        ovsam.AutomaticConfig(min_area=0)
    with pytest.raises(ValueError, match="stability"):
        ovsam.AutomaticConfig(stability=1.5)


def test_model_package_does_not_pull_in_ray_or_storage():
    import subprocess
    import sys
    code = ("import sys, ovsam; ovsam.load_model('tiny', device='cpu'); "
            "bad = [m for m in ('ray', 'click', 'fsspec', 's3fs', 'pyarrow') if m in sys.modules]; "
            "print(','.join(bad))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_convnext_clip_tower_variant(tmp_path, image):
    """ConvNeXt towers (timm inside open_clip): four maps at strides 4..32, regions by mask pooling."""
    import dataclasses

    from ovsam.config import ClipTowerConfig
    config, _ = ovsam.load_config("tiny")
    convnext = ClipTowerConfig(arch="convnext_atto", open_clip_config={
        "embed_dim": 64,
        "vision_cfg": {"timm_model_name": "convnext_atto", "timm_model_pretrained": False, "timm_pool": "",
                       "timm_proj": "mlp", "image_size": 256},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
    })
    model = ovsam.build_model(dataclasses.replace(config, clip=convnext))
    assert not model.clip.is_resnet
    with torch.inference_mode():
        maps = model.clip.features(torch.zeros(1, 3, 512, 512))
    assert [m.shape[-1] for m in maps] == [128, 64, 32, 16]
    predictor = ovsam.Predictor(model, ovsam.Vocabulary.from_spec("a,b"), cache_dir=tmp_path)
    predictor.set_image(image)
    prediction = predictor.predict(boxes=np.array([[10, 10, 100, 100]], np.float32))
    assert prediction.masks.shape == (1, 240, 320) and np.isfinite(prediction.scores).all()


def test_roi_coordinates_stay_float32_with_bf16_maps():
    """bf16 rounds 1001.3 to 1000: RoIs must be aligned with float32 coordinates whatever the maps' dtype."""
    from ovsam.clip2sam import MultiLevelRoIAlign
    torch.manual_seed(0)
    maps = [torch.randn(1, 4, 1024 // s, 1024 // s).bfloat16() for s in (4, 8, 16, 32)]
    rois = torch.tensor([[0, 1001.3, 3.7, 1017.9, 20.1], [0, 10.5, 700.3, 1001.3, 1020.6]])
    extractor = MultiLevelRoIAlign(output_size=3, finest_scale=56)
    ours = extractor(maps, rois).float()
    reference = extractor([m.float() for m in maps], rois)
    torch.testing.assert_close(ours, reference, atol=1e-2, rtol=1e-2)  # bf16 output rounding only
    rounded = extractor([m.float() for m in maps], rois.bfloat16().float())
    assert (rounded - reference).abs().max() > 0.05  # the test would see the rounding


@pytest.mark.parametrize("heads", [1, 4])
def test_region_branch_projected_once_per_image_equals_pooling_each_region(heads):
    """Aligning regions from the projected map equals open_clip's attention pool on each aligned region,
    boxes crossing the map's border and smaller than a cell included (random weights and biases)."""
    from open_clip.modified_resnet import AttentionPool2d
    from torchvision.ops import roi_align

    from ovsam.clip_tower import attention_pool_projected

    torch.manual_seed(0)
    grid, channels = 5, 32
    pool = AttentionPool2d(grid, channels, heads, output_dim=24).eval()
    for linear in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
        torch.nn.init.normal_(linear.bias)
    coarse = torch.randn(2, channels, 9, 11)
    rois = torch.tensor([[0, 10.0, 20.0, 300.0, 250.0], [1, 0.0, 0.0, 352.0, 288.0], [1, 40.3, 7.9, 47.1, 12.2],
                         [0, -30.0, 250.0, 380.0, 330.0], [1, 100.5, 100.5, 100.5, 100.5]])
    with torch.inference_mode():
        reference = pool(roi_align(coarse, rois, grid, spatial_scale=1 / 32, sampling_ratio=0, aligned=True))
        weight = torch.cat([pool.k_proj.weight, pool.v_proj.weight])[:, :, None, None]
        maps = torch.cat([coarse, torch.nn.functional.conv2d(coarse, weight)], dim=1)
        crops = roi_align(maps, rois, grid, spatial_scale=1 / 32, sampling_ratio=0, aligned=True).flatten(2)
        ours = attention_pool_projected(pool, *crops.split(channels, dim=1))
    assert reference.abs().max() > 1  # not a degenerate comparison
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_model_region_branch_matches_the_attention_pool_of_each_region(tiny):
    """The model's CLIP branch (maps projected once in `region_maps`) against open_clip's pool per region."""
    from torchvision.ops import roi_align

    torch.manual_seed(1)
    pixels = torch.randn(2, 3, tiny.config.image_size, tiny.config.image_size)
    rois = torch.tensor([[0, 3.0, 5.0, 200.0, 480.0], [1, 250.2, 10.7, 511.0, 140.3], [1, 0.0, 0.0, 16.0, 16.0]])
    with torch.inference_mode():
        coarse = tiny.embed_image(pixels).clip_maps[-1]
        crops = roi_align(coarse, rois, tiny.clip.region_grid, spatial_scale=1 / 32, sampling_ratio=0, aligned=True)
        reference = tiny.clip.model.visual.attnpool(crops)
        ours = tiny.clip.pool_regions(tiny.clip.region_maps(coarse), rois, None)
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)


def test_head_with_a_shared_dense_prompt_equals_one_image_side_per_prompt(tiny):
    """One image and a shared dense prompt: the image side enters the transformer once (batch 1, broadcast
    against the prompts); the masks and RoI embeddings are those of the image side repeated per prompt."""
    torch.manual_seed(2)
    pixels = torch.randn(2, 3, tiny.config.image_size, tiny.config.image_size)
    points = torch.rand(5, 1, 2) * tiny.config.image_size
    with torch.inference_mode():
        features = tiny.embed_image(pixels)
        sparse, dense = tiny.encode_prompts(points=points)
        assert dense.shape[0] == 1
        image_pe = tiny.prompt_encoder.get_dense_pe()
        for index in (torch.ones(5, dtype=torch.long), torch.tensor([0, 1, 1, 0, 1])):
            shared = tiny.head(features.embedding, image_pe, sparse, dense, index, features.fpn_maps,
                               tiny.config.image_size)
            repeated = tiny.head(features.embedding, image_pe, sparse, dense.expand(5, -1, -1, -1), index,
                                 features.fpn_maps, tiny.config.image_size)
            assert shared.low_res_masks.shape == (5, 1, *shared.low_res_masks.shape[-2:])
            # Not a degenerate comparison: the prompts give different masks, well above the tolerance.
            assert (shared.low_res_masks[0] - shared.low_res_masks[2]).abs().max() > 1e-2
            for name in ("low_res_masks", "mask_boxes", "roi_embeddings"):
                torch.testing.assert_close(getattr(shared, name), getattr(repeated, name), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("image_batch, tokens", [(3, 4), (1, 4), (3, 20)],
                         ids=["per-prompt image side", "shared image side", "more tokens than a head's channels"])
def test_folded_transformer_equals_segment_anything_forward_and_gradients(image_batch, tokens):
    """`FoldedTwoWayTransformer` against segment_anything's `TwoWayTransformer` with the same weights (the
    released decoder's widths, a small grid): outputs and parameter gradients, so fine-tuning is unchanged."""
    from segment_anything.modeling.transformer import TwoWayTransformer

    from ovsam.transformer import FoldedTwoWayTransformer

    torch.manual_seed(3)
    widths = dict(depth=2, embedding_dim=256, num_heads=8, mlp_dim=2048)
    reference, folded = TwoWayTransformer(**widths), FoldedTwoWayTransformer(**widths)
    folded.load_state_dict(reference.state_dict())
    image = torch.randn(image_batch, 256, 12, 12)
    image_pe, points = torch.randn(1, 256, 12, 12), torch.randn(3, tokens, 256)
    outputs = []
    for module in (reference, folded):
        module.zero_grad()
        queries, keys = module(image, image_pe, points)
        (queries.square().sum() + keys.sin().sum()).backward()
        outputs.append((queries, keys, {name: p.grad.clone() for name, p in module.named_parameters()}))
    (q_ref, k_ref, g_ref), (q_ours, k_ours, g_ours) = outputs
    assert q_ours.shape == (3, tokens, 256) and k_ours.shape == (3, 144, 256)
    torch.testing.assert_close(q_ours, q_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(k_ours, k_ref, atol=1e-4, rtol=1e-4)
    assert g_ours.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g_ours[name], g_ref[name], atol=1e-3, rtol=1e-3, msg=name)


def test_pixelwise_mask_logits_equal_the_upscaling_modules():
    """`SingleMaskDecoder.mask_logits` against SAM's `output_upscaling` + hypernetwork, in image order."""
    from ovsam.clip2sam import CPU_UPSCALE_PROMPTS, SingleMaskDecoder
    from ovsam.config import DecoderConfig

    torch.manual_seed(4)
    decoder = SingleMaskDecoder(DecoderConfig()).eval()
    n, (gh, gw) = CPU_UPSCALE_PROMPTS + 2, (6, 10)  # more prompts than one CPU chunk, a non-square grid
    image_tokens, mask_tokens = torch.randn(n, gh * gw, 256), torch.randn(n, 256)
    with torch.inference_mode():
        upscaled = decoder.output_upscaling(image_tokens.transpose(1, 2).reshape(n, 256, gh, gw))
        hyper = decoder.output_hypernetworks_mlps[0](mask_tokens)
        reference = torch.einsum("nc,nchw->nhw", hyper, upscaled)[:, None]
        ours = decoder.mask_logits(image_tokens, (gh, gw), mask_tokens)
    assert ours.shape == (n, 1, 4 * gh, 4 * gw)
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)
