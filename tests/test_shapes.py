"""The synthetic shapes generator: reproducible, annotations agree with the pixels, the documented ranges hold."""

from __future__ import annotations

import json

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image
from pycocotools.coco import COCO

from jobs import shapes


def test_draw_is_reproducible_and_independent_of_set_size():
    image_a, objects_a = shapes.draw_image(seed=3, index=5, size=96, max_objects=6)
    image_b, objects_b = shapes.draw_image(seed=3, index=5, size=96, max_objects=6)
    other, _ = shapes.draw_image(seed=4, index=5, size=96, max_objects=6)
    assert np.array_equal(image_a, image_b) and not np.array_equal(image_a, other)
    assert [c for c, _ in objects_a] == [c for c, _ in objects_b]
    assert all(np.array_equal(m, n) for (_, m), (_, n) in zip(objects_a, objects_b))


def test_masks_are_visible_disjoint_and_coloured_uniformly():
    for index in range(20):
        image, objects = shapes.draw_image(seed=0, index=index, size=128, max_objects=6)
        assert 1 <= len(objects) <= 6
        union = np.zeros((128, 128), int)
        for class_id, mask in objects:
            assert 0 <= class_id < len(shapes.SHAPE_CLASSES) and mask.any()
            union += mask
            # A shape is one solid colour: all its visible pixels are equal.
            assert len(np.unique(image[mask].reshape(-1, 3), axis=0)) == 1
        assert union.max() <= 1, "visible masks of overlapping shapes must not overlap"


def test_sizes_stay_in_the_documented_range():
    size = 200
    extents = []
    for index in range(40):
        _, objects = shapes.draw_image(seed=1, index=index, size=size, max_objects=1)
        (_, mask), = objects  # one object: nothing hides it
        ys, xs = np.nonzero(mask)
        extents.append(max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / size)
    # The drawn extent never exceeds the circumscribed diameter (40 % + a rasterisation pixel) and
    # is at least the inscribed size of the smallest shape (a star's inner radius stays inside).
    assert max(extents) <= shapes.MAX_SIZE_FRACTION + 1 / size
    assert min(extents) >= shapes.MIN_SIZE_FRACTION * 0.5
    assert max(extents) > 0.25 and min(extents) < 0.15, "sizes should spread over the range"


def test_generate_writes_images_and_coco_that_agree(tmp_path):
    path = shapes.generate(shapes.ShapesConfig(str(tmp_path), num_images=6, seed=9, size=64))
    coco = COCO(str(path))
    data = json.loads(path.read_text())
    assert [c["name"] for c in data["categories"]] == list(shapes.SHAPE_CLASSES)
    assert len(coco.imgs) == 6 and len(coco.anns) >= 6
    for image_id, info in coco.imgs.items():
        pixels = np.asarray(Image.open(tmp_path / "images" / info["file_name"]))
        assert pixels.shape == (64, 64, 3)
        _, objects = shapes.draw_image(9, image_id - 1, 64, 6)
        anns = coco.imgToAnns[image_id]
        assert len(anns) == len(objects)
        for ann, (class_id, mask) in zip(anns, objects):
            assert ann["category_id"] == class_id + 1
            assert np.array_equal(coco.annToMask(ann).astype(bool), mask)
            assert ann["area"] == mask.sum()
            assert ann["bbox"] == list(mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))))
