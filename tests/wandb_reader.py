"""Reads W&B offline runs back (the .wandb transaction log), so tests check what W&B received.

W&B has no public reader for offline runs; this walks its leveldb-style log format: 32 KiB
blocks of chunks with a 7-byte header, reassembled into protobuf records.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

_BLOCK = 32768  # records never straddle a 7-byte header gap at a block's end
_HEADER = 7


def offline_run_dirs(directory: str | Path) -> list[Path]:
    """The offline run folders W&B made under a directory (it nests them in wandb/)."""
    return sorted(Path(directory).glob("wandb/offline-run-*"))


def read_offline_run(run_dir: str | Path) -> dict[str, Any]:
    """Read an offline run's transaction log back: its run info (id, group, project, name,
    tags, job type), config, history, summary, files and artifacts."""
    (log,) = Path(run_dir).glob("run-*.wandb")
    out: dict[str, Any] = {
        "run": {}, "config": {}, "history": [], "summary": {}, "files": [], "artifacts": [],
    }  # fmt: skip
    for record in _records(log.read_bytes()):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out["run"] = {
                "id": run.run_id, "group": run.run_group, "project": run.project,
                "name": run.display_name, "tags": list(run.tags), "job_type": run.job_type,
            }  # fmt: skip
            out["config"].update(_items(run.config.update))
        elif kind == "artifact":
            out["artifacts"].append(_artifact(record.artifact))
        elif kind == "config":
            out["config"].update(_items(record.config.update))
        elif kind == "history":
            out["history"].append(_items(record.history.item))
        elif kind == "summary":
            out["summary"].update(_items(record.summary.update))
        elif kind == "files":
            out["files"].extend(f.path for f in record.files.files)
    return out


def _artifact(artifact: Any) -> dict[str, Any]:
    return {
        "name": artifact.name,
        "type": artifact.type,
        "metadata": json.loads(artifact.metadata) if artifact.metadata else {},
        "files": {
            entry.path: {"local_path": entry.local_path, "ref": entry.ref, "size": entry.size}
            for entry in artifact.manifest.contents
        },
    }


def _items(items: Any) -> dict[str, Any]:
    parsed = {}
    for item in items:
        key = "/".join(item.nested_key) if item.nested_key else item.key
        parsed[key] = json.loads(item.value_json) if item.value_json else None
    return parsed


def _records(data: bytes) -> Iterator[wandb_internal_pb2.Record]:
    """Reassemble the log's chunks (full, first, middle, last) into protobuf records."""
    if data[:4] != b":W&B":
        raise ValueError("not a W&B transaction log")
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER:
            pos += _BLOCK - pos % _BLOCK
            continue
        length, chunk_type = struct.unpack_from("<HB", data, pos + 4)
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if chunk_type in (1, 2):  # full or first
            pending = chunk
        else:
            pending += chunk
        if chunk_type in (1, 4):  # full or last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""
