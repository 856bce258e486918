"""Session fixtures shared by every test: one real local Ray and one real S3 server (moto) per session.

Both are real services on loopback, not mocks: Ray Data and Ray Train run their actual schedulers, and
S3 traffic goes over HTTP through s3fs / pyarrow to moto's server.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
from collections.abc import Iterator

import pytest

# Fake credentials for the loopback S3 server; moto accepts any key. Region is required by botocore.
_FAKE_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-access-key",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
    "AWS_SESSION_TOKEN": "testing-session-token",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# Enough CPU slots for a decode stage, a model actor and a writer to run side by side on a 2-core
# machine (Ray slots are logical; oversubscription only costs speed).
_RAY_TEST_CPUS = 4


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class S3Server:
    """A running moto S3 server: ``endpoint_url`` is ``http://127.0.0.1:PORT``."""

    endpoint_url: str

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (at least 3 characters, S3 naming rules) and return ``"s3://name"``."""
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint_url).create_bucket(Bucket=name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A moto ``ThreadedMotoServer`` on 127.0.0.1 with the AWS environment pointing at it for the session.

    Sets ``AWS_ENDPOINT_URL`` and fake credentials in ``os.environ`` (restored afterwards) so that s3fs,
    boto3 and processes started later (Ray workers, CLI subprocesses) all talk to it.
    """
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per S3 request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint_url = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {**_FAKE_S3_ENV, "AWS_ENDPOINT_URL": endpoint_url}.items():
            patch.setenv(key, value)
        try:
            yield S3Server(endpoint_url=endpoint_url)
        finally:
            server.stop()


@dataclasses.dataclass(frozen=True)
class RayCluster:
    """The session's local Ray: ``address`` is the GCS address a subprocess can join with ``--address``."""

    address: str
    num_cpus: int


@pytest.fixture(scope="session")
def ray_cluster(s3_server: S3Server) -> Iterator[RayCluster]:
    """One local Ray for the session (``num_cpus=4``, no dashboard).

    Depends on ``s3_server`` so the S3 environment exists before Ray starts: worker processes inherit
    the environment of the moment Ray starts, and must reach the same S3 server as the test.
    """
    import ray

    ray.init(num_cpus=_RAY_TEST_CPUS, include_dashboard=False)
    try:
        yield RayCluster(address=ray.get_runtime_context().gcs_address, num_cpus=_RAY_TEST_CPUS)
    finally:
        ray.shutdown()
