"""What survives what: label runs through a loopback proxy that injects storage faults into every request.

A moto S3 server on loopback holds the inputs (box mode, small images) and the output; `tests.fault_proxy`
sits in front of it and answers a share of all requests (listings, reads, writes) with ``503 SlowDown``, a
connection reset mid-response, or a delay. For each fault rate the same command is run again until a run
leaves nothing for the next one (at most ``--max-runs``), and the output is then checked directly on the server:
every image exactly one row, no annotation id twice, only committed parts. Prints one line per rate.

``--outage S`` adds one more scenario: every request for an input image is answered ``503 SlowDown`` for S
seconds from the first one (listings and writes pass), a store that is down for reads for a while. Each run is
the ``ovsam-batch label`` command itself (in this process, on this process's Ray), so its exit code and the
summary lines a user reads are printed: 0 for a complete run, 75 when images were left for the next run.

    python benchmarks/bench_faults.py --rates 0.1 0.3 0.6 --images 40
    python benchmarks/bench_faults.py --storage-attempts 2 --rates 0.3 0.6 --outage 10
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_FAKE_ENV = {"AWS_ACCESS_KEY_ID": "bench-key", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _outage(seconds: float, prefix: str):
    """A `FaultProxy` ``only`` filter: true for requests under ``prefix`` during ``seconds`` from the first one."""
    began: list[float] = []

    def during(method: str, path: str) -> bool:
        if not path.startswith(prefix):
            return False
        if not began:
            began.append(time.monotonic())
        return time.monotonic() - began[0] < seconds

    return during


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=float, nargs="*", default=[0.1, 0.3, 0.6])
    parser.add_argument("--outage", type=float, metavar="S", help="also a read outage of S seconds")
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--delay", type=float, nargs=2, default=[1.0, 3.0], metavar=("MIN_S", "MAX_S"))
    parser.add_argument("--storage-attempts", type=int, default=None, help="default: the pipeline's default")
    parser.add_argument("--max-runs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    os.environ.update(_FAKE_ENV)
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ["AWS_ENDPOINT_URL"] = endpoint  # Ray workers inherit it (the runs pass the proxy explicitly)

    import boto3
    import fsspec
    import ray

    from click.testing import CliRunner

    from ovsam_batch.label_cmd import label as label_command
    from pipelines.output import OutputStore
    from pipelines.storage import STORAGE_ATTEMPTS
    from schemas.tables import ANNOTATIONS_DIR, IMAGES_DIR, STAGING_DIR, STATUS_OK
    from tests.fault_proxy import FaultProxy
    from tests.pipeline_cases import shapes_image

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench-faults")
    fs = fsspec.filesystem("s3")
    images, annotations = [], []
    for index in range(args.images):
        buffer = io.BytesIO()
        shapes_image(index, 96, 64).save(buffer, "JPEG")
        fs.pipe(f"bench-faults/images/img_{index:03d}.jpg", buffer.getvalue())
        images.append({"id": index, "file_name": f"img_{index:03d}.jpg"})
        for box in [[4, 4, 30, 30], [40, 10, 40, 40]][: 1 + index % 2]:
            annotations.append({"id": len(annotations), "image_id": index, "bbox": box})
    fs.pipe("bench-faults/prompts.json", json.dumps({"images": images, "annotations": annotations}).encode())

    ray.init(include_dashboard=False, logging_level="ERROR")
    attempts = [] if args.storage_attempts is None else ["--storage-attempts", str(args.storage_attempts)]
    print(f"{args.images} images, box mode, {len(annotations)} boxes, storage attempts "
          f"{args.storage_attempts or STORAGE_ATTEMPTS}")
    scenarios = [(f"{rate:.0%} of all requests (SlowDown / reset mid-response / delay {args.delay[0]}-"
                  f"{args.delay[1]} s, equal shares)", f"out-{int(rate * 100)}",
                  dict(rate=rate, seed=args.seed, delay_s=tuple(args.delay))) for rate in args.rates]
    if args.outage:
        scenarios.append((f"read outage of {args.outage:g} s (SlowDown on every image request)", "out-outage",
                          dict(rate=1.0, kinds=("slowdown",), only=_outage(args.outage, "/bench-faults/images/"))))
    for name, prefix, faults in scenarios:
        output = f"s3://bench-faults/{prefix}"
        started = time.monotonic()
        outcomes = []
        with FaultProxy(endpoint, **faults) as proxy:
            command = ["s3://bench-faults/images", "--output", output, "--mode", "box",
                       "--prompts", "s3://bench-faults/prompts.json", "--preset", "tiny", "--batch-size", "4",
                       "--part-size", "10",
                       "--endpoint-url", proxy.endpoint_url, *attempts]
            while len(outcomes) < args.max_runs:
                run_started = time.monotonic()
                result = CliRunner().invoke(label_command, command)
                # The summary's first line, the deferral line and an error; the progress bar may share a line.
                lines = [match.group(0) for match in re.finditer(
                    r"(Labelled |Error: |\d+ images not labelled this run)[^\n\r]*", result.output)]
                if result.exception is not None and not isinstance(result.exception, SystemExit):
                    lines.append(f"crashed: {result.exception!r}")  # a bug, not a storage outcome
                outcomes.append(f"exit {result.exit_code} after {time.monotonic() - run_started:.0f} s: "
                                + " / ".join(lines))
                if result.exit_code == 0:
                    break
            counts = dict(proxy.counts)
        store = OutputStore(output, endpoint)
        rows = store.read_table(IMAGES_DIR).to_pylist()
        ids = store.read_table(ANNOTATIONS_DIR).column("annotation_id").to_pylist()
        uris = [row["image_uri"] for row in rows]
        exactly_once = (len(uris) == len(set(uris)) == args.images and len(ids) == len(set(ids)) == len(annotations)
                        and not store.fs.find(store.path(STAGING_DIR)))
        print(f"{name}: {len(outcomes)} run(s) in {time.monotonic() - started:.0f} s; requests {counts.get('requests')}, "
              f"slowdown {counts.get('slowdown', 0)}, reset {counts.get('reset', 0)}, delay {counts.get('delay', 0)}; "
              f"final: {sum(r['status'] == STATUS_OK for r in rows)}/{args.images} ok, exactly once: {exactly_once}",
              flush=True)
        for number, outcome in enumerate(outcomes, 1):
            print(f"    run {number}: {outcome}", flush=True)
    ray.shutdown()
    server.stop()


if __name__ == "__main__":
    main()
