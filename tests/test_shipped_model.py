"""The offline `shapes` model shipped in the package still does its job on shapes it never saw.

It guards the checkpoint files and everything between them and a label (loading, preprocessing, both
classification branches, the fusion, mask upscaling): a wrong key, a broken transform or a bad
re-export shows as a drop in these numbers long before it shows in a demo.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ovsam
from jobs import shapes
from ovsam.clip2sam import masks_to_boxes

# Neither the training set (seed 1), the held-out set (2) nor the validation set (3) of the recipe.
SEED = 4
# Square images: the shipped model was trained on 256 px squares (the widened recipe is not shipped yet).
IMAGE_SIZE = 256
NUM_IMAGES = 30
# Measured on the widened generator's 256 px squares (textures, blur, occlusion, low contrast, small shapes),
# which this model (trained on the earlier, plainer generator) never saw: IoU 0.666, accuracy 0.632 on 114
# shapes. Asserted with a margin; a broken checkpoint, key mapping, transform or fusion falls far below.
MIN_MEAN_IOU = 0.62
MIN_ACCURACY = 0.57
