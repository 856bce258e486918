"""The offline `shapes` model shipped in the package still does its job on shapes it never saw.

It guards the checkpoint files and everything between them and a label (loading, preprocessing, both
classification branches, the fusion, mask upscaling): a wrong key, a broken transform or a bad
re-export shows as a drop in these numbers long before it shows in a demo.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

import ovsam
from jobs import shapes
from ovsam.clip2sam import masks_to_boxes

# Neither the training set (seed 1), the held-out set (2) nor the validation set (3) of the recipe.
SEED = 4
NUM_IMAGES = 30
IMAGE_SIZE = 256
# The targets of the model (mean IoU 0.80, accuracy 0.90) less a margin for a sample of 115 objects
# (they give 0.856 and 0.913; the held-out set of 697 gave 0.862 and 0.917).
MIN_MEAN_IOU = 0.78
MIN_ACCURACY = 0.85


def test_shipped_shapes_model_segments_and_names_unseen_shapes(tmp_path):
    model = ovsam.load_model("shapes", device="cpu")
    predictor = ovsam.Predictor(model, cache_dir=tmp_path)
    names = predictor.vocabulary.names
    ious, correct = [], []
    for index in range(NUM_IMAGES):
        image, objects = shapes.draw_image(SEED, index, IMAGE_SIZE, max_objects=6)
        # Through JPEG, as the recipe's images are.
        _, encoded = cv2.imencode(".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, shapes.JPEG_QUALITY])
        image = np.ascontiguousarray(cv2.imdecode(encoded, cv2.IMREAD_COLOR)[..., ::-1])
        truth = np.stack([mask for _, mask in objects])
        predictor.set_image(image)
        prediction = predictor.predict(boxes=masks_to_boxes(torch.from_numpy(truth)).numpy())
        intersection = (prediction.masks & truth).sum((1, 2))
        union = (prediction.masks | truth).sum((1, 2))
        ious.extend(intersection / union)
        correct.extend(names[label] == shapes.SHAPE_CLASSES[class_id]
                       for label, (class_id, _) in zip(prediction.label_ids, objects))
    assert len(correct) >= 80
    assert np.mean(ious) >= MIN_MEAN_IOU, f"mean IoU {np.mean(ious):.3f} on {len(ious)} unseen shapes"
    assert np.mean(correct) >= MIN_ACCURACY, f"accuracy {np.mean(correct):.3f} on {len(correct)} unseen shapes"
