"""Cluster runs: a real two-node Ray on this machine (a head and a worker node, each started with ``ray start``
in its own temp dir and working directory), labelled into with ``ovsam-batch label --address``.

The head offers no CPUs (as on a real cluster whose head only schedules), so decoding and the model stage
run on the worker node. The model is a directory given by a path relative to the driver's working directory:
it exists for the driver only (the nodes' processes run elsewhere), so the run works only because the model
reaches the actors through the object store.

Ray 2.60 turns token authentication on for a new cluster when a token exists (``~/.ray/auth_token``, made by
any earlier ``ray.init()``), but a process joining with an explicit address never turns it on by itself: every
process here gets ``RAY_AUTH_MODE=token`` and the cluster's own token in ``RAY_AUTH_TOKEN``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch

import ovsam
from pipelines.output import OutputStore
from pipelines.predict import load_model_files, model_files
from schemas.tables import ANNOTATIONS_DIR, IMAGES_DIR, STATUS_OK
from tests.pipeline_cases import shapes_image

REPO = Path(__file__).resolve().parents[1]
NUM_IMAGES = 6
WORKER_CPUS = 2  # a decode actor and a model actor side by side on the worker node
_START_TIMEOUT_S = 180
_RUN_TIMEOUT_S = 400
_STOP_TIMEOUT_S = 30
# Run in a subprocess joined to the cluster: waits until the worker node is up, then checks from the worker
# node that the driver's relative model path means nothing there.
_WAIT_FOR_WORKER = """
import os, sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
deadline = time.monotonic() + float(sys.argv[2])
while ray.cluster_resources().get("CPU", 0) < float(sys.argv[3]):
    assert time.monotonic() < deadline, "the worker node did not join"
    time.sleep(1)
where = ray.get(ray.remote(num_cpus=1)(lambda: (ray.get_runtime_context().get_node_id(), os.getcwd(),
                                                os.path.exists("model"))).remote())
print(where[1], where[2])
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ray_cli() -> str:
    return str(Path(sys.executable).parent / "ray")


class TwoNodeRay:
    """``ray start --block`` head and worker processes, each in its own session (process group), stopped by
    signalling those groups only: other Ray clusters on this machine are left alone (no global ``ray stop``)."""

    def __init__(self, root: Path, env: dict):
        import ray.util

        self.root, self.env = root, env
        self.port = _free_port()
        # The node's own IP: Ray turns 127.0.0.1 in an address into it anyway.
        self.address = f"{ray.util.get_node_ip_address()}:{self.port}"
        self.nodes_cwd = root / "nodes"
        self.nodes_cwd.mkdir()
        self.processes: list[subprocess.Popen] = []

    def _start(self, name: str, *args: str) -> None:
        log = open(self.root / f"{name}.log", "wb")
        self.processes.append(subprocess.Popen(
            [_ray_cli(), "start", "--block", "--temp-dir", str(self.root / name),
             "--dashboard-agent-listen-port", str(_free_port()), "--min-worker-port", "0", "--max-worker-port", "0",
             "--disable-usage-stats", *args],
            cwd=self.nodes_cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        self._wait_started(name, self.processes[-1])

    def _wait_started(self, name: str, process: subprocess.Popen) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while "Ray runtime started" not in self.log(name):
            assert process.poll() is None, f"ray start ({name}) exited: {self.log(name)}"
            assert time.monotonic() < deadline, f"ray start ({name}) did not start: {self.log(name)}"
            time.sleep(1)

    def start(self) -> None:
        self._start("head", "--head", "--port", str(self.port), "--num-cpus", "0", "--include-dashboard", "false",
                    "--dashboard-port", str(_free_port()), "--ray-client-server-port", str(_free_port()))
        self._start("worker", "--address", self.address, "--num-cpus", str(WORKER_CPUS))

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        for process in reversed(self.processes):  # the worker node first, then the head
            _signal_group(process, signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
            _signal_group(process, signal.SIGKILL)  # what the node left behind in its session
        # Ray processes that left the session are still known by the temp dir in their command line.
        for leftover in psutil.process_iter(["cmdline"]):
            if str(self.root) in " ".join(leftover.info["cmdline"] or ()):
                leftover.kill()


def _signal_group(process: subprocess.Popen, number: int) -> None:
    try:
        os.killpg(process.pid, number)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def two_node_ray():
    """One two-node cluster for this module's tests (starting one costs tens of seconds)."""
    root = Path(tempfile.mkdtemp(prefix="ovsam-ray-", dir="/tmp"))  # short: Ray's socket paths live under it
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), PYTHONPATH=str(REPO))
    cluster = TwoNodeRay(root, env)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


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


@pytest.mark.slow
def test_a_label_run_on_a_two_node_cluster_runs_on_the_worker_node_with_a_model_only_the_driver_has(
        two_node_ray, tmp_path):
    images, output = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    names = [f"img_{index}.jpg" for index in range(NUM_IMAGES)]
    for index, name in enumerate(names):
        shapes_image(index, 64, 48).save(images / name)
    (tmp_path / "boxes.json").write_text(json.dumps({
        "images": [{"id": index, "file_name": name} for index, name in enumerate(names)],
        "annotations": [{"id": index, "image_id": index, "bbox": [4, 4, 24, 20]} for index in range(NUM_IMAGES)]}))
    ovsam.save_model(ovsam.load_model("tiny", device="cpu"), tmp_path / "model")

    waited = subprocess.run([sys.executable, "-c", _WAIT_FOR_WORKER, two_node_ray.address, str(_START_TIMEOUT_S),
                             str(WORKER_CPUS)], cwd=two_node_ray.nodes_cwd, env=two_node_ray.env,
                            capture_output=True, text=True, timeout=_START_TIMEOUT_S + 60)
    assert waited.returncode == 0, (waited.stderr[-3000:], two_node_ray.log("head"), two_node_ray.log("worker"))
    node_cwd, model_visible_on_node = waited.stdout.split()
    assert model_visible_on_node == "False" and Path(node_cwd) != tmp_path  # the model is the driver's alone

    run = subprocess.run(
        [str(Path(sys.executable).parent / "ovsam-batch"), "label", str(images), "--output", str(output),
         "--mode", "box", "--prompts", "boxes.json", "--preset", "model", "--batch-size", "2",
         "--address", two_node_ray.address],
        cwd=tmp_path, env=two_node_ray.env, capture_output=True, text=True, timeout=_RUN_TIMEOUT_S)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"{NUM_IMAGES} ok, 0 errors" in run.stdout

    store = OutputStore(str(output))
    rows = store.read_table(IMAGES_DIR).to_pylist()
    assert sorted(row["image_uri"].rsplit("/", 1)[1] for row in rows) == names
    assert all(row["status"] == STATUS_OK and row["num_annotations"] == 1 for row in rows)
    assert store.read_table(ANNOTATIONS_DIR).num_rows == NUM_IMAGES
    # The model actor ran on the worker node: Ray names each worker process's actor in its node's logs.
    worker_logs = " ".join(path.read_text(errors="replace")
                           for path in (two_node_ray.root / "worker").glob("session_*/logs/worker-*.out"))
    head_logs = " ".join(path.read_text(errors="replace")
                         for path in (two_node_ray.root / "head").glob("session_*/logs/worker-*.out"))
    assert "LabelImages" in worker_logs and "LabelImages" not in head_logs


@pytest.mark.slow
def test_joining_a_token_cluster_without_its_token_is_one_sentence(two_node_ray, tmp_path):
    (tmp_path / "images").mkdir()
    shapes_image(0, 64, 48).save(tmp_path / "images" / "img_0.jpg")
    env = {key: value for key, value in two_node_ray.env.items() if key not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    run = subprocess.run(
        [str(Path(sys.executable).parent / "ovsam-batch"), "label", str(tmp_path / "images"), "--output",
         str(tmp_path / "out"), "--preset", "tiny", "--address", two_node_ray.address],
        env=env, capture_output=True, text=True, timeout=_RUN_TIMEOUT_S)
    assert run.returncode == 1
    assert "RAY_AUTH_MODE=token" in run.stderr and "Traceback" not in run.stderr, run.stderr[-3000:]
