"""Cluster runs: the model reaches every actor from the driver, through the object store (`model_files`).

The two-node ``ray start`` test of issue 12 is not in the suite yet: on this machine it could not be seen
passing end to end (its nodes timed out starting under load)."""

from __future__ import annotations

import shutil

import torch

import ovsam
from pipelines.predict import load_model_files, model_files


def test_the_model_actors_build_from_the_drivers_files_is_the_drivers_model(tmp_path):
    # float16 files, as the shipped model's: the driver's model (float32 once loaded) must arrive unchanged
    ovsam.save_model(ovsam.load_model("tiny", device="cpu"), tmp_path / "model", dtype=torch.float16)
    driver = ovsam.load_model(str(tmp_path / "model"), device="cpu")
    files = model_files(driver)
    assert all(isinstance(data, bytes) for data in files.values())
    shutil.rmtree(tmp_path / "model")  # the actor side needs nothing but the bytes
    actor = load_model_files(files).to("cpu")
    assert actor.config == driver.config  # both name the files of a model directory
    expected, got = driver.state_dict(), actor.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[key], got[key]) for key in expected)
