"""A real S3 API on loopback for tests: moto's server mode (HTTP, its own thread), one per test
session, a fresh bucket per test. The endpoint and credentials reach advlab the way a user's
do: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY in the environment."""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import Iterator

import pyarrow.fs as pafs
import pytest

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on a free loopback port, for the whole session."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def s3_env(endpoint: str) -> dict[str, str]:
    """What a user sets to point advlab (and every Ray node) at an S3-compatible server."""
    return {"AWS_ENDPOINT_URL": endpoint, **CREDENTIALS}


@pytest.fixture
def bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A new empty bucket on the loopback server, this process's environment pointed at it;
    returns its s3:// URI."""
    for name, value in s3_env(s3_endpoint).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    name = f"advlab-{uuid.uuid4().hex[:12]}"
    s3_filesystem(s3_endpoint, create=True).create_dir(name)
    return f"s3://{name}"


def s3_filesystem(endpoint: str, create: bool = False) -> pafs.S3FileSystem:
    """An S3 client of the test's own (not advlab's) for looking at what landed."""
    return pafs.S3FileSystem(
        endpoint_override=endpoint, access_key="testing", secret_key="testing",
        region="us-east-1", allow_bucket_creation=create,
    )  # fmt: skip


def object_keys(endpoint: str, uri: str) -> list[str]:
    """Every object under an s3:// URI, as paths below it."""
    root = uri.removeprefix("s3://").rstrip("/")
    selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
    infos = s3_filesystem(endpoint).get_file_info(selector)
    return sorted(i.path[len(root) + 1 :] for i in infos if i.type == pafs.FileType.File)
