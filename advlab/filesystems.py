"""Storage paths and URIs as filesystem objects: the one place that turns `storage` (a local
path, s3://, gs://, ...) into a pyarrow.fs filesystem, and says in one line when remote storage
cannot hold a sweep. store.py does every file operation through the object made here.

pyarrow.fs rather than fsspec/s3fs: pyarrow already reads and writes every parquet file here and
Ray Tune takes a pyarrow filesystem for its checkpoints, so one object serves both, with no new
dependency.
"""

from __future__ import annotations

import os

import pyarrow.fs as pafs

from advlab.text import one_line


class BadStorage(ValueError):
    """Storage that cannot hold a sweep, said in one line with its fix: a malformed endpoint,
    an endpoint that does not answer or refuses the credentials, a bucket that does not exist."""


ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")  # as the AWS SDKs read them


def s3_endpoint() -> str | None:
    """The S3 endpoint from the environment (an S3-compatible server: MinIO, moto), or None
    for AWS itself. Read here, not left to pyarrow: older pyarrow releases ignore these
    variables and would send the requests to AWS."""
    for name in ENDPOINT_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value:
            scheme, _, host = value.partition("://")
            if scheme not in ("http", "https") or not host.strip("/"):
                raise BadStorage(
                    f"storage: {name}={value!r} is no endpoint URL; give http(s)://HOST:PORT, "
                    "e.g. http://127.0.0.1:9000"
                )
            return value.rstrip("/")
    return None


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem object and path inside it of a storage path or URI. s3:// takes its
    endpoint from AWS_ENDPOINT_URL(_S3) and its credentials and region from the usual AWS
    variables, files or instance role."""
    endpoint = s3_endpoint() if uri.startswith("s3://") else None
    if endpoint is None:
        return pafs.FileSystem.from_uri(uri)
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    fs = pafs.S3FileSystem(endpoint_override=endpoint, region=region or "us-east-1")
    return fs, uri.removeprefix("s3://").rstrip("/")


def check_reachable(fs: pafs.FileSystem, root: str, uri: str) -> None:
    """Remote storage answers and its bucket exists, or BadStorage says which and the fix
    (local storage: nothing to check here; `preflight.check_writable` checks folders)."""
    if isinstance(fs, pafs.LocalFileSystem):
        return
    bucket = root.split("/", 1)[0]
    where = (s3_endpoint() or "AWS") if uri.startswith("s3://") else "its service"
    try:
        found = fs.get_file_info(bucket).type
    except OSError as err:
        why = one_line(err, 160)
        raise BadStorage(
            f"storage: cannot reach {uri} at {where} ({why}); check AWS_ENDPOINT_URL, the "
            "bucket and the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
        ) from None
    if found == pafs.FileType.NotFound:
        make = f" (aws s3 mb s3://{bucket})" if uri.startswith("s3://") else ""
        raise BadStorage(
            f"storage: no bucket {bucket!r} at {where}; create it{make} or give a bucket that "
            "exists"
        )


def is_object_store(fs: pafs.FileSystem) -> bool:
    """S3 and GCS: no folders, no atomic rename (a move is a copy), but every object is
    written whole or not at all."""
    return fs.type_name in ("s3", "gcs")
