"""Storage faults, on the session's real S3 server (moto) behind a loopback proxy that injects real ones
(`tests.fault_proxy`): transient faults retried and never turned into error rows, write failures stopping the
run with one sentence and resuming exactly once, one run per output (the lease), no bucket ever created."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import time
from pathlib import Path

import boto3
import botocore.exceptions
import fsspec
import pytest
from click.testing import CliRunner

from ovsam_batch.label_cmd import label as label_command
from ovsam.automatic import AutomaticConfig
from pipelines.config import LabelConfig
from pipelines.label import LabelError, run_label
from pipelines.output import LEASE_FILE, Lease, OutputError, OutputStore
from pipelines.prompts import PromptsFileError, load_box_prompts
from pipelines.storage import create_exclusive, is_transient, open_fs
from schemas.tables import ANNOTATIONS_DIR, IMAGES_DIR, RUN_FILE, STAGING_DIR, STATUS_OK
from tests.fault_proxy import FaultProxy
from tests.pipeline_cases import shapes_image

NUM_IMAGES = 16
# Delays short enough that a run through the proxy stays well under a minute on two cores.
TEST_DELAY_S = (0.1, 0.5)
# Attempts per request (botocore) when a test wants a fault to outlast the retries quickly; s3fs still retries
# SlowDown and cut-off bodies a few times on top.
FEW_ATTEMPTS = 1


def _client_error(code: str, status: int) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def _translated(error: BaseException, as_error: OSError) -> OSError:
    as_error.__cause__ = error  # as s3fs raises them: an OSError whose cause is botocore's error
    return as_error


@pytest.mark.parametrize("error, transient", [
    (_client_error("SlowDown", 503), True),
    (_client_error("503", 503), True),  # a HEAD answer has no body, so no code but the status
    (_client_error("InternalError", 500), True),
    (_client_error("ThrottlingException", 400), True),
    (_client_error("429", 429), True),
    (_translated(_client_error("SlowDown", 503), OSError(errno.EBUSY, "Service Unavailable")), True),
    (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), True),
    (TimeoutError("read timed out"), True),
    (botocore.exceptions.ReadTimeoutError(endpoint_url="http://s3"), True),
    (_client_error("NoSuchKey", 404), False),
    (_client_error("AccessDenied", 403), False),
    (_translated(_client_error("NoSuchKey", 404), FileNotFoundError("The specified key does not exist")), False),
    (_translated(_client_error("AccessDenied", 403), PermissionError("Access Denied")), False),
    (_translated(_client_error("InvalidObjectState", 403), OSError(errno.EIO, "archived")), False),
    (ValueError("damaged"), False),
])
def test_transient_and_permanent_errors_are_told_apart(error, transient):
    assert is_transient(error) is transient


def test_real_faults_outlasting_the_retries_are_transient_and_a_missing_object_is_not(s3_server):
    bucket = s3_server.make_bucket("fault-kinds")
    fsspec.filesystem("s3").pipe(f"{bucket}/object", b"data")
    for kind in ("slowdown", "reset"):
        with FaultProxy(s3_server.endpoint_url, rate=1.0, kinds=(kind,)) as proxy:
            fs, path = open_fs(f"{bucket}/object", proxy.endpoint_url, attempts=2)
            with pytest.raises(Exception) as caught:
                fs.cat_file(path)
            assert is_transient(caught.value), (kind, repr(caught.value))
            assert proxy.counts[kind] >= 2  # tried again before giving up
    fs, path = open_fs(f"{bucket}/missing", s3_server.endpoint_url)
    with pytest.raises(FileNotFoundError) as caught:
        fs.cat_file(path)
    assert not is_transient(caught.value)


def test_the_prompts_file_is_read_with_the_runs_budget_and_a_transient_failure_says_run_again(s3_server):
    bucket = s3_server.make_bucket("fault-prompts")
    fsspec.filesystem("s3").pipe(f"{bucket}/prompts.json", b'{"images": [], "annotations": []}')
    with FaultProxy(s3_server.endpoint_url, rate=1.0, kinds=("slowdown",)) as proxy:
        with pytest.raises(PromptsFileError) as caught:
            load_box_prompts(f"{bucket}/prompts.json", proxy.endpoint_url, attempts=FEW_ATTEMPTS)
    assert "transient storage fault" in str(caught.value) and "--storage-attempts" in str(caught.value)
    # botocore tried FEW_ATTEMPTS times per s3fs try (s3fs retries SlowDown 5 times), not the default budget
    assert proxy.counts["slowdown"] <= 5 * FEW_ATTEMPTS
    assert load_box_prompts(f"{bucket}/prompts.json", s3_server.endpoint_url, attempts=FEW_ATTEMPTS) == {}


def _box_inputs(fs, prefix: str, count: int = NUM_IMAGES) -> tuple[list[str], str]:
    """``count`` small images and a COCO prompts file (one or two boxes each) under ``prefix``."""
    import io

    names, images, annotations = [], [], []
    for index in range(count):
        name = f"img_{index:02d}.jpg"
        buffer = io.BytesIO()
        shapes_image(index, 64, 48).save(buffer, "JPEG")
        fs.pipe(f"{prefix}/images/{name}", buffer.getvalue())
        names.append(f"{prefix}/images/{name}")
        images.append({"id": index, "file_name": name})
        for box in [[4, 4, 20, 20], [30, 10, 30, 30]][: 1 + index % 2]:
            annotations.append({"id": len(annotations), "image_id": index, "bbox": box})
    fs.pipe(f"{prefix}/prompts.json", json.dumps({"images": images, "annotations": annotations}).encode())
    return names, f"{prefix}/prompts.json"


def _assert_exactly_once(output: str, endpoint_url: str, uris: list[str], boxes: int) -> None:
    """Read back directly from the server: every image one ok row, every box one annotation, ids unique, and
    only committed parts (each annotations part has its images part, nothing left in staging)."""
    store = OutputStore(output, endpoint_url)
    images = store.read_table(IMAGES_DIR).to_pylist()
    assert sorted(row["image_uri"] for row in images) == sorted(uris)
    assert all(row["status"] == STATUS_OK for row in images), [r["error"] for r in images if r["status"] != STATUS_OK]
    ids = store.read_table(ANNOTATIONS_DIR).column("annotation_id").to_pylist()
    assert len(ids) == len(set(ids)) == boxes
    parts = store.committed_parts()
    annotation_parts = sorted(p.rsplit("part-", 1)[-1].removesuffix(".parquet")
                              for p in store.fs.find(store.path(ANNOTATIONS_DIR)))
    assert annotation_parts == parts
    assert not store.fs.find(store.path(STAGING_DIR))
    assert not store.fs.exists(store.path(LEASE_FILE))


def test_runs_through_seeded_faults_label_every_image_exactly_once(ray_cluster, s3_server):
    """30 % of all requests (reads, listings, writes) fail: SlowDown, resets mid-response, delays."""
    bucket = s3_server.make_bucket("faulty-run")
    fs = fsspec.filesystem("s3")
    uris, prompts = _box_inputs(fs, bucket)
    output = f"{bucket}/out"
    with FaultProxy(s3_server.endpoint_url, rate=0.3, seed=7, delay_s=TEST_DELAY_S) as proxy:
        config = LabelConfig(input=f"{bucket}/images", output=output, mode="box", prompts=prompts, batch_size=4,
                             part_size=6, endpoint_url=proxy.endpoint_url)
        deferred = []
        for _ in range(3):  # a fault that outlasts the retries leaves its image for the next run
            summary = run_label(config, show_progress=False)
            deferred.append(summary.run_deferred)
            if not summary.run_deferred:
                break
        assert all(proxy.counts[kind] > 0 for kind in ("slowdown", "reset", "delay")), proxy.counts
    assert deferred[-1] == 0, deferred
    _assert_exactly_once(output, s3_server.endpoint_url, uris, boxes=NUM_IMAGES + NUM_IMAGES // 2)
    record = json.loads(fs.cat_file(f"{output}/{RUN_FILE}"))
    assert record["status"] == "complete"


def test_reads_that_keep_failing_are_left_for_the_next_run_not_written_as_errors(ray_cluster, s3_server):
    bucket = s3_server.make_bucket("deferred-reads")
    fs = fsspec.filesystem("s3")
    uris, prompts = _box_inputs(fs, bucket, count=6)
    output = f"{bucket}/out"
    flaky = ("img_01.jpg", "img_04.jpg")
    with FaultProxy(s3_server.endpoint_url, rate=1.0, kinds=("slowdown",),
                    only=lambda method, path: path.split("?")[0].endswith(flaky)) as proxy:
        result = CliRunner().invoke(label_command, [
            f"{bucket}/images", "-o", output, "--mode", "box", "--prompts", prompts, "--batch-size", "2",
            "--endpoint-url", proxy.endpoint_url, "--storage-attempts", str(FEW_ATTEMPTS)])
    assert result.exit_code == 75, result.output  # EX_TEMPFAIL: run again
    assert "2 images not labelled this run, will be retried" in result.output
    store = OutputStore(output, s3_server.endpoint_url)
    rows = store.read_table(IMAGES_DIR).to_pylist()
    assert sorted(r["image_uri"] for r in rows) == sorted(u for u in uris if not u.endswith(flaky))
    assert json.loads(fs.cat_file(f"{output}/{RUN_FILE}"))["status"] == "incomplete"

    again = CliRunner().invoke(label_command, [f"{bucket}/images", "-o", output, "--mode", "box",
                                               "--prompts", prompts, "--batch-size", "2"])
    assert again.exit_code == 0, again.output
    assert "Labelled 2 images" in again.output
    _assert_exactly_once(output, s3_server.endpoint_url, uris, boxes=6 + 3)


def _cli(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "ovsam-batch"), "label", *args]


@pytest.mark.slow
def test_a_write_that_keeps_failing_stops_with_one_sentence_and_the_next_run_resumes(ray_cluster, s3_server):
    bucket = s3_server.make_bucket("failing-writes")
    fs = fsspec.filesystem("s3")
    uris, prompts = _box_inputs(fs, bucket, count=8)
    output = f"{bucket}/out"
    # Every PUT of a part file answers SlowDown: the first part the writer actor publishes fails.
    with FaultProxy(s3_server.endpoint_url, rate=1.0, kinds=("slowdown",),
                    only=lambda method, path: method == "PUT" and f"/{STAGING_DIR}/" in path) as proxy:
        run = subprocess.run(_cli(f"{bucket}/images", "-o", output, "--mode", "box", "--prompts", prompts,
                                  "--batch-size", "2", "--part-size", "4", "--address", ray_cluster.address,
                                  "--endpoint-url", proxy.endpoint_url, "--storage-attempts", str(FEW_ATTEMPTS)),
                             capture_output=True, text=True, timeout=240)
    assert run.returncode == 1, run.stderr[-3000:]
    assert f"could not write to the output {output}" in run.stderr
    assert "Traceback" not in run.stderr and "RayTaskError" not in run.stderr, run.stderr[-3000:]
    error_lines = [line for line in run.stderr.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1 and "the same command resumes" in error_lines[0], run.stderr[-3000:]
    record = json.loads(fs.cat_file(f"{output}/{RUN_FILE}"))
    assert record["status"] == "failed" and "could not write" in record["error"]

    again = subprocess.run(_cli(f"{bucket}/images", "-o", output, "--mode", "box", "--prompts", prompts,
                                "--batch-size", "2", "--address", ray_cluster.address),
                           capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    _assert_exactly_once(output, s3_server.endpoint_url, uris, boxes=8 + 4)


def test_a_missing_bucket_or_an_unwritable_output_stops_before_any_work(ray_cluster, s3_server, tmp_path):
    (tmp_path / "images").mkdir()
    shapes_image(0, 32, 32).save(tmp_path / "images" / "a.jpg")
    with pytest.raises(LabelError, match="its bucket does not exist .*never creates buckets"):
        run_label(LabelConfig(input=str(tmp_path / "images"), output="s3://no-such-bucket/out"), show_progress=False)
    buckets = [b["Name"] for b in boto3.client("s3", endpoint_url=s3_server.endpoint_url).list_buckets()["Buckets"]]
    assert "no-such-bucket" not in buckets
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(LabelError, match=r"^cannot use the output .*a-file/out: NotADirectoryError"):
        run_label(LabelConfig(input=str(tmp_path / "images"), output=str(tmp_path / "a-file" / "out")),
                  show_progress=False)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_one_run_per_output_a_live_lease_refuses_a_stale_one_is_taken_over(ray_cluster, s3_server, tmp_path, where):
    output = str(tmp_path / "out") if where == "local" else f"{s3_server.make_bucket('lease-' + where)}/out"
    (tmp_path / "images").mkdir()
    shapes_image(1, 32, 32).save(tmp_path / "images" / "a.jpg")
    config = LabelConfig(input=str(tmp_path / "images"), output=output, automatic=AutomaticConfig(points_per_side=2))
    store = OutputStore(output)

    held = Lease(store)
    held.acquire()  # a run in progress (this process: alive)
    with pytest.raises(OutputError, match="another label run"):
        Lease(store).acquire()
    with pytest.raises(LabelError, match=r"^another label run \(host .*\) is writing into .*out: its lease"):
        run_label(config, show_progress=False)
    assert not store.committed_parts()
    held.release()
    assert not store.fs.exists(store.path(LEASE_FILE))

    # A run on another machine that died holding the output: its lease expired a minute ago.
    stale = {"run_id": "dead", "host": "elsewhere", "pid": 1, "started_at": "then", "expires_at": time.time() - 60}
    create_exclusive(store.fs, store.path(LEASE_FILE), json.dumps(stale).encode())
    summary = run_label(config, show_progress=False)
    assert summary.stale_lease["run_id"] == "dead" and summary.run_images == 1
    assert not store.fs.exists(store.path(LEASE_FILE))  # released at the end


def test_a_lease_of_a_killed_process_on_this_machine_is_stale_at_once(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lease = Lease(store)
    create_exclusive(store.fs, store.path(LEASE_FILE), json.dumps(
        {**lease.holder, "run_id": "killed", "pid": dead.pid, "expires_at": time.time() + 600}).encode())
    assert lease.acquire()["run_id"] == "killed"
    assert lease.read()["run_id"] == lease.holder["run_id"]
    lease.release()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_of_runs_taking_over_one_stale_lease_at_once_exactly_one_wins(s3_server, tmp_path, monkeypatch, where):
    """The worst interleaving, made certain: every contender has read the stale lease and judged it stale before
    any of them replaces it."""
    import threading

    import pipelines.output

    output = str(tmp_path / "out") if where == "local" else f"{s3_server.make_bucket('lease-race-' + where)}/out"
    store = OutputStore(output)
    contenders = 4
    judged = threading.Barrier(contenders)
    waited = threading.local()
    is_stale = pipelines.output._is_stale

    def judged_together(lease):
        if not getattr(waited, "done", False):  # the first judgement of each contender: the stale lease
            waited.done = True
            judged.wait(timeout=30)
        return is_stale(lease)

    monkeypatch.setattr(pipelines.output, "_is_stale", judged_together)
    for round_ in range(3):
        stale = {"run_id": f"dead-{round_}", "host": "elsewhere", "pid": 1, "expires_at": time.time() - 60}
        if store.fs.exists(store.path(LEASE_FILE)):
            store.fs.rm(store.path(LEASE_FILE))
        create_exclusive(store.fs, store.path(LEASE_FILE), json.dumps(stale).encode())
        leases = [Lease(store) for _ in range(contenders)]
        outcomes: dict[int, object] = {}

        def contend(index):
            waited.done = False
            try:
                outcomes[index] = leases[index].acquire()
            except OutputError as err:
                outcomes[index] = err

        threads = [threading.Thread(target=contend, args=(index,)) for index in range(contenders)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        winners = [index for index, outcome in outcomes.items() if isinstance(outcome, dict)]
        assert len(outcomes) == contenders and len(winners) == 1, outcomes
        assert outcomes[winners[0]]["run_id"] == f"dead-{round_}"
        assert all("another label run" in str(outcome) for index, outcome in outcomes.items() if index not in winners)
        assert Lease(store).read()["run_id"] == leases[winners[0]].holder["run_id"]
        leases[winners[0]].release()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_renewal_never_overwrites_the_lease_of_a_run_that_took_over(s3_server, tmp_path, where):
    output = str(tmp_path / "out") if where == "local" else f"{s3_server.make_bucket('lease-renew-' + where)}/out"
    store = OutputStore(output)
    held = Lease(store)
    held.acquire()
    assert held.renew() and held.renew()  # its own lease: extended, again and again
    assert held.read()["run_id"] == held.holder["run_id"]
    newcomer = {"run_id": "newcomer", "host": "elsewhere", "pid": 1, "expires_at": time.time() + 600}
    store.fs.pipe_file(store.path(LEASE_FILE), json.dumps(newcomer).encode())  # took over while we stalled
    assert not held.renew()
    assert held.read()["run_id"] == "newcomer"
    held.release()
    assert held.read()["run_id"] == "newcomer"  # released ours only
