"""Multi-node, tested (issue 25): two torchrun agents (`--nnodes 2`, one process each, c10d rendezvous on
localhost, one shared run directory) train what `esper train --nproc 2` trains, bit for bit.

Left out, measured: a worker SIGKILLed on one node (--max-restarts 1 to 3), three tries here: one restart
completed with the straight run's figures, one group ended FAILED when the restarted group's gloo connect was
refused, one hung past 240 s. Restarts across nodes are torch's elastic agent and not yet an Esper guarantee."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (
    BASE_TOML,
    ESPER,
    GROWING,
    free_port,
    metrics_without_wall_clock,
    rank_env,
    sets,
    summary,
)

JOB = [*GROWING, "trainer.epochs=12"]


def _agents(run: Path, job: str, *, restarts: int = 0) -> list[subprocess.Popen[str]]:
    """Two torchrun agents of one two-node job, as two machines would start them."""
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", job,
           "--max-restarts", str(restarts), "--monitor-interval", "0.5",
           "-m", "esper", "--config", str(BASE_TOML), "train", "--quiet", "--run-dir", str(run), *sets(*JOB)]
    return [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=rank_env())
            for _ in range(2)]


def _finish(agents: list[subprocess.Popen[str]]) -> list[str]:
    logs = [a.communicate(timeout=240)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], "\n".join(logs)
    return logs


@pytest.fixture(scope="module")
def nproc2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("one-node") / "run"
    done = subprocess.run([str(ESPER), "--config", str(BASE_TOML), "train", "--nproc", "2", "--quiet",
                           "--run-dir", str(run), *sets(*JOB)], capture_output=True, text=True, env=rank_env(),
                          timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    return run


@pytest.mark.slow
def test_two_agents_rendezvous_and_train_what_one_node_of_two_trains(nproc2: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _finish(_agents(run, "two-nodes"))
    s = summary(run)
    assert s["status"] == "COMPLETED" and s["world"]["world_size"] == 2 and s["world"]["restart"] == 0
    assert [r["dir"] for r in s["world"]["ranks"]] == ["rank-1"]
    assert metrics_without_wall_clock(run) == metrics_without_wall_clock(nproc2)
    assert metrics_without_wall_clock(run / "rank-1") == metrics_without_wall_clock(run)
