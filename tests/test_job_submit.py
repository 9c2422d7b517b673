"""The cluster path as a user takes it: `ray start --head`, then `ray job submit --working-dir`
with a sweep file and a model module in that folder, then the results on storage."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import tiny_sweep
from test_resume import _kill_session

from advlab import results

RAY = str(Path(sys.executable).parent / "ray")
MODULE = """
import math
from torch import nn

def build(input_shape, num_classes, width=16):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.Sigmoid(),
                         nn.Linear(width, num_classes))
"""


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture
def head() -> str:
    """A real Ray head with a job server on free ports, stopped (only it) afterwards."""
    gcs, dashboard, client, agent, grpc, env_agent, metrics = free_ports(7)
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # Ray's socket paths must stay short
    # Ray's token authentication, as a cluster should run: head and CLI share ~/.ray/auth_token
    # (made once here if this machine has none) and the CLI sends it when told to.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "token"}
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, capture_output=True, check=True)
    command = [
        RAY, "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={grpc}", f"--runtime-env-agent-port={env_agent}",
        f"--metrics-export-port={metrics}", f"--temp-dir={temp}", "--disable-usage-stats",
    ]  # fmt: skip
    # --block keeps Ray's processes tied to this one: ending its session stops that cluster
    # alone (never `ray stop`, which would stop every Ray on the machine).
    process = subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        probe = subprocess.run(
            [RAY, "job", "list", "--address", address], capture_output=True, env=env, timeout=60
        )
        if probe.returncode == 0:
            break
        assert process.poll() is None, "ray start --head exited"
        time.sleep(2)
    else:
        pytest.fail("the Ray head's job server never answered")
    yield address
    _kill_session(process.pid)  # a private cluster: killed outright (a graceful stop takes ~30 s)
    process.wait()


@pytest.mark.slow
def test_ray_job_submit_runs_a_sweep_shipped_as_the_working_dir(head: str, tmp_path: Path) -> None:
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "jobnets.py").write_text(MODULE)
    raw = tiny_sweep(name="submitted", model="jobnets:build", grid={"model_args.width": [8, 16]})
    raw |= {"storage": str(tmp_path / "results"), "wandb": {"mode": "offline"}}
    raw["transfer"] = {"controls": ["constant"]}
    (job_dir / "sweep.yaml").write_text(yaml.safe_dump(raw))
    entrypoint = f"{sys.executable} -m advlab.cli sweep sweep.yaml --address auto"
    # The head turns on Ray's token authentication; the CLI sends the token (~/.ray/auth_token)
    # only when told to.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "token"}
    done = subprocess.run(
        [RAY, "job", "submit", "--address", head, "--working-dir", str(job_dir), "--",
         *entrypoint.split()],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2/2 trials ok" in done.stdout
    assert "succeeded" in done.stdout.lower()
    res = results.load(str(tmp_path / "results" / "submitted"))
    assert res.trials["label"].tolist() == ["width=8", "width=16"]
    assert (res.trials["status"] == "ok").all()
    assert len(res.transfer) and (res.transfer["status"] == "ok").all()
    runs = list((tmp_path / "results" / "submitted" / "wandb").glob("offline-run-*"))
    assert len(runs) >= 2  # the offline W&B runs landed in the sweep's storage
    # A relative storage would land in Ray's temporary copy of the working dir: refused, in
    # one line, by the submitted command itself (Ray's job environment tells it apart).
    (job_dir / "relative.yaml").write_text(yaml.safe_dump(raw | {"storage": "results"}))
    refused = subprocess.run(
        [RAY, "job", "submit", "--address", head, "--working-dir", str(job_dir), "--",
         sys.executable, "-m", "advlab.cli", "validate", "relative.yaml"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert refused.returncode != 0, refused.stdout[-3000:] + refused.stderr[-2000:]
    assert "storage: 'results' is relative, and under `ray job submit`" in refused.stdout
