"""The synthetic shapes generator: reproducible, annotations agree with the pixels, the documented ranges hold."""

from __future__ import annotations

import json

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image
from pycocotools.coco import COCO

from jobs import shapes


def test_draw_is_reproducible_and_independent_of_set_size():
    a = shapes.draw_image(seed=3, index=5, sides=(96, 160))
    b = shapes.draw_image(seed=3, index=5, sides=(96, 160))
    other = shapes.draw_image(seed=4, index=5, sides=(96, 160))
    assert np.array_equal(a.image, b.image) and not np.array_equal(a.image, other.image)
    assert a.jpeg_quality == b.jpeg_quality
    assert [c for c, _ in a.objects] == [c for c, _ in b.objects]
    assert all(np.array_equal(m, n) for (_, m), (_, n) in zip(a.objects, b.objects))


def test_visible_masks_are_disjoint_and_non_empty():
    for index in range(30):
        drawn = shapes.draw_image(seed=0, index=index, sides=(100, 200))
        height, width = drawn.image.shape[:2]
        assert 100 <= height <= 200 and 100 <= width <= 200
        assert 1 <= len(drawn.objects) <= 6
        union = np.zeros((height, width), int)
        for class_id, mask in drawn.objects:
            assert 0 <= class_id < len(shapes.SHAPE_CLASSES) and mask.any() and mask.shape == (height, width)
            union += mask
        assert union.max() <= 1, "visible masks of overlapping shapes must not overlap"


def test_images_vary_in_what_users_images_vary_in():
    drawn = [shapes.draw_image(seed=2, index=index) for index in range(60)]
    ratios = [d.image.shape[1] / d.image.shape[0] for d in drawn]
    assert max(ratios) > 1.5 and min(ratios) < 1 / 1.5, "landscape and portrait images"
    assert all(shapes.DEFAULT_MIN_SIDE <= s <= shapes.DEFAULT_MAX_SIDE for d in drawn for s in d.image.shape[:2])
    assert len({d.jpeg_quality for d in drawn}) > 10
    assert all(shapes.JPEG_QUALITY[0] <= d.jpeg_quality <= shapes.JPEG_QUALITY[1] for d in drawn)
    # Some shapes are filled with a texture (many colours), some are cut by the image border.
    spreads = [d.image[m].std(axis=0).max() for d in drawn for _, m in d.objects]
    assert min(spreads) < 8 < max(spreads)
    assert any(m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any() for d in drawn for _, m in d.objects)


def test_sizes_stay_in_the_documented_range():
    extents = []
    for index in range(60):
        drawn = shapes.draw_image(seed=1, index=index, sides=(200, 300), max_objects=1)
        if not drawn.objects:
            continue
        (_, mask), = drawn.objects
        ys, xs = np.nonzero(mask)
        extents.append(max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / min(mask.shape))
    # The visible extent never exceeds the circumscribed diameter (40 % of the shorter side + a
    # rasterisation pixel); small shapes are common (log-uniform sizes).
    assert max(extents) <= shapes.MAX_SIZE_FRACTION + 1 / 200
    assert min(extents) >= shapes.MIN_SIZE_FRACTION * 0.4
    assert max(extents) > 0.25 and np.mean(np.array(extents) < 0.15) > 0.3, "sizes should spread, small ones common"


def test_generate_writes_images_and_coco_that_agree(tmp_path):
    path = shapes.generate(shapes.ShapesConfig(str(tmp_path), num_images=6, seed=9, min_side=64, max_side=96))
    coco = COCO(str(path))
    data = json.loads(path.read_text())
    assert [c["name"] for c in data["categories"]] == list(shapes.SHAPE_CLASSES)
    assert len(coco.imgs) == 6 and len(coco.anns) >= 6
    for image_id, info in coco.imgs.items():
        pixels = np.asarray(Image.open(tmp_path / "images" / info["file_name"]))
        drawn = shapes.draw_image(9, image_id - 1, (64, 96), 6)
        assert pixels.shape == drawn.image.shape == (info["height"], info["width"], 3)
        assert np.array_equal(pixels, drawn.as_written()) or np.abs(pixels.astype(int) - drawn.as_written()).max() <= 1
        anns = coco.imgToAnns[image_id]
        assert len(anns) == len(drawn.objects)
        for ann, (class_id, mask) in zip(anns, drawn.objects):
            assert ann["category_id"] == class_id + 1
            assert np.array_equal(coco.annToMask(ann).astype(bool), mask)
            assert ann["area"] == mask.sum()
            assert ann["bbox"] == list(mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))))
