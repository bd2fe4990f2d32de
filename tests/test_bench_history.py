"""bench/history.py runs end to end and prints every figure, on SQLite and on PostgreSQL: a smoke
test at tiny sizes (``--quick``), which builds its template with the real engine and its histories
through the ledger, starts a real web process and a real worker. It checks that each figure is
printed for each database and size, never what the figures are (timing belongs to the bench)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PG_SERVER

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

REPO = Path(__file__).resolve().parent.parent


def test_bench_history_quick_prints_every_figure_for_each_database_and_size(tmp_path: Path) -> None:
    from bench.history import LABELS

    env = {k: v for k, v in os.environ.items() if not k.startswith(("SOPFLOW_", "PREFECT_"))}
    argv = [sys.executable, str(REPO / "bench" / "history.py"), "--quick", "--sizes", "20,50"]
    argv += ["--db", "sqlite,postgresql", "--cache", str(tmp_path / "cache"), "--postgres", PG_SERVER, "--no-keep"]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    blocks: dict[str, list[str]] = {}
    for line in out.stdout.split("\nfigures (", 1)[1].split("\ntargets at", 1)[0].splitlines()[1:]:
        if re.match(r"^  \S", line):
            label = line.strip()
            blocks[label] = []
        else:
            blocks[label].append(line)
    assert set(blocks) == set(LABELS.values())
    figure = r"(\d+\.\d (ms|s|%)|> \d+ s|n/a)"
    for label in LABELS.values():
        block = "\n".join(blocks[label])
        for db in ("sqlite", "postgresql"):
            for n in ("20", "50"):
                assert re.search(rf"{db}\s+N=\s*{n}\s+{figure}", block), f"{label}: no figure for {db} N={n}\n{block}"
    assert "targets at N = 100,000: not measured" in out.stdout
    assert "built in" in out.stdout
    # --no-keep: the PostgreSQL databases it built are gone.
    from sqlalchemy import create_engine, text

    admin = create_engine(f"{PG_SERVER}/postgres")
    with admin.connect() as conn:
        left = conn.execute(text("SELECT datname FROM pg_database WHERE datname LIKE 'histbench_%'")).all()
    admin.dispose()
    (key,) = [p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert not {f"histbench_{key}_{n}_o20" for n in (20, 50)} & {name for (name,) in left}
