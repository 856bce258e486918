"""What survives what: label runs through a loopback proxy that injects storage faults into every request.

A moto S3 server on loopback holds the inputs (box mode, small images) and the output; `tests.fault_proxy`
sits in front of it and answers a share of all requests (listings, reads, writes) with ``503 SlowDown``, a
connection reset mid-response, or a delay. For each fault rate the same command is run again until a run
leaves nothing for the next one (at most ``--max-runs``), and the output is then checked directly on the server:
every image exactly one row, no annotation id twice, only committed parts. Prints one line per rate.

    python benchmarks/bench_faults.py --rates 0.1 0.3 0.6 --images 40
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_FAKE_ENV = {"AWS_ACCESS_KEY_ID": "bench-key", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.1, 0.3, 0.6])
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--delay", type=float, nargs=2, default=[1.0, 3.0], metavar=("MIN_S", "MAX_S"))
    parser.add_argument("--storage-attempts", type=int, default=None, help="default: the pipeline's default")
    parser.add_argument("--max-runs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    os.environ.update(_FAKE_ENV)
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ["AWS_ENDPOINT_URL"] = endpoint  # Ray workers inherit it (the runs pass the proxy explicitly)

    import boto3
    import fsspec
    import ray

    from pipelines.config import LabelConfig
    from pipelines.label import LabelError, run_label
    from pipelines.output import OutputStore
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
    extra = {} if args.storage_attempts is None else {"storage_attempts": args.storage_attempts}
    print(f"{args.images} images, box mode, {len(annotations)} boxes; faults on every request: SlowDown / reset "
          f"mid-response / delay {args.delay[0]}-{args.delay[1]} s, in equal shares")
    for rate in args.rates:
        output = f"s3://bench-faults/out-{int(rate * 100)}"
        started = time.monotonic()
        runs, outcomes = 0, []
        with FaultProxy(endpoint, rate=rate, seed=args.seed, delay_s=tuple(args.delay)) as proxy:
            config = LabelConfig(input="s3://bench-faults/images", output=output, mode="box",
                                 prompts="s3://bench-faults/prompts.json", batch_size=4, part_size=10,
                                 endpoint_url=proxy.endpoint_url, **extra)
            while runs < args.max_runs:
                runs += 1
                try:
                    summary = run_label(config, show_progress=False)
                except LabelError as err:
                    outcomes.append(f"stopped: {err}")
                    continue
                outcomes.append(f"{summary.run_images} written, {summary.run_deferred} left for next run, "
                                f"errors {dict(summary.run_errors) or 0}")
                if not summary.run_deferred:
                    break
            counts = dict(proxy.counts)
        store = OutputStore(output, endpoint)
        rows = store.read_table(IMAGES_DIR).to_pylist()
        ids = store.read_table(ANNOTATIONS_DIR).column("annotation_id").to_pylist()
        uris = [row["image_uri"] for row in rows]
        exactly_once = (len(uris) == len(set(uris)) == args.images and len(ids) == len(set(ids)) == len(annotations)
                        and not store.fs.find(store.path(STAGING_DIR)))
        print(f"rate {rate:.0%}: {runs} run(s) in {time.monotonic() - started:.0f} s; requests {counts.get('requests')}, "
              f"slowdown {counts.get('slowdown', 0)}, reset {counts.get('reset', 0)}, delay {counts.get('delay', 0)}; "
              f"final: {sum(r['status'] == STATUS_OK for r in rows)}/{args.images} ok, exactly once: {exactly_once}")
        for number, outcome in enumerate(outcomes, 1):
            print(f"    run {number}: {outcome}")
    ray.shutdown()
    server.stop()


if __name__ == "__main__":
    main()
