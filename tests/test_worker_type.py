"""Issue 12: sopflow's worker is a Prefect worker type, and its deployment carries no secret.

On the installation of tests/cluster.py (a Prefect server on PostgreSQL, workers as hosts).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import REPO, Cluster
from tests.waiting import eventually

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

SECRET = "s3cret-Db-pa55"
"""A database password that must never reach Prefect."""


@pytest.fixture(autouse=True)
def _no_workers_left(cluster: Cluster) -> Iterator[None]:  # each test starts the workers it needs
    yield
    cluster.stop_workers()


def test_prefect_worker_start_type_sopflow_runs_a_run(cluster):
    """`prefect worker start --type sopflow --pool sopflow` (the plugin entry point, nothing else)
    starts sopflow's worker: Prefect lists it online in the pool with its type, and it runs a run."""
    cluster.start_worker("host-c", prefect_cli=True)
    eventually(lambda: cluster.online("host-c"), "Prefect never listed host-c's worker online in the pool")
    pool = cluster.api("GET", "/work_pools/sopflow")
    assert pool["type"] == "sopflow"
    run_id = cluster.start("fo_probe", "prefect-cli")
    cluster.sign(run_id, "go")
    cluster.wait_step(run_id, "confirm", "waiting")
    fr = cluster.flow_run(run_id)
    assert fr["name"] == f"fo_probe-{run_id[:8]}"
    assert {"institution:fo_hospital", "sop:fo_probe", "sop-version:1"} <= set(fr["tags"])
    assert fr["parameters"]["run_id"] == run_id
    assert fr["parameters"]["sop_id"] == "fo_probe"
    assert fr["labels"]["prefect.worker.type"] == "sopflow"


def _clean_shell(cluster: Cluster, home: Path) -> dict[str, str]:
    """A deployer's shell: sopflow's settings as a worker would have them, password and home included."""
    env = cluster.env(home)
    env["SOPFLOW_DATABASE_URL"] = f"postgresql+psycopg2://sopflow:{SECRET}@db.hospital.internal/sopflow"
    env["SOPFLOW_HOME"] = str(home / "sopflow-data")
    env["PREFECT_HOME"] = str(home / "prefect")
    return env


@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "-m", "flows", "server", "deploy"],
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"],
    ],
    ids=["sopflow-server-deploy", "prefect-deploy-from-prefect-yaml"],
)
def test_a_deployment_made_from_a_clean_shell_shows_no_secret(cluster, tmp_path, command):
    home = tmp_path / "deployer"
    home.mkdir()
    env = _clean_shell(cluster, home)
    if "prefect" in command:  # prefect.yaml's pool must exist first, as its header says
        subprocess.run([sys.executable, "-m", "flows", "server", "deploy"], env=env, check=True, capture_output=True)
    out = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    deployment = cluster.api("GET", "/deployments/name/run-sop/sopflow")
    pool = cluster.api("GET", "/work_pools/sopflow")
    shown = json.dumps([deployment, pool])
    assert SECRET not in shown
    assert "db.hospital.internal" not in shown
    assert str(home) not in shown
    assert deployment["job_variables"] == {}
    assert deployment["work_pool_name"] == "sopflow"
    assert deployment["entrypoint"] == "flows.engine.run_sop:run_sop"
    assert "env" not in json.dumps(pool["base_job_template"]["job_configuration"])
