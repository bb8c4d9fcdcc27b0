"""The GPU check (issue 25, Deliver 6): real runs on a CUDA device, for when one is lent. Deselected where torch
sees no CUDA device (tests/conftest.py), never skipped or faked; ``scripts/gpu_check.sh`` runs them with the CUDA
bench rows. Each run is the real `esper` console script, with cuBLAS made deterministic
(``CUBLAS_WORKSPACE_CONFIG``), so a resume on the same GPU can be compared bit for bit with a straight run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import (
    GROWING,
    assert_same_tensors,
    break_fast_tier,
    events,
    finish,
    latest,
    metrics_without_wall_clock,
    out,
    spawn,
    spawn_resume,
    summary,
    tensors,
    train,
    verify,
)

from esper.core.errors import ExitCode

GPU_ENV = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
CUDA_JOB = [*GROWING, "run.device=cuda", "trainer.epochs=6"]


def _esper_train(run: Path, *items: str, log: Path, flags: tuple[str, ...] = ()) -> int:
    return finish(spawn(run, *items, log=log, flags=flags, env=GPU_ENV), log, timeout=300)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_growing_run_completes_on_cuda_in_every_precision(tmp_path: Path, precision: str) -> None:
    run, log = tmp_path / "run", tmp_path / "log"
    assert _esper_train(run, *CUDA_JOB, f"run.precision={precision}", log=log) == 0, log.read_text()
    s = summary(run)
    assert s["status"] == "COMPLETED" and s["epochs_completed"] == 6
    assert any(seed["stage"] != "DORMANT" for seed in s["seeds"]), s["seeds"]  # a seed grew on the GPU
    assert verify(run).exit_code == 0
    assert all(t.device.type == "cpu" for t in tensors(latest(run), "model").values())  # a device-free checkpoint


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_stop_and_resume_on_the_same_gpu_is_bit_identical_to_a_straight_run(tmp_path: Path, precision: str
                                                                              ) -> None:
    items = [*CUDA_JOB, f"run.precision={precision}", "trainer.accumulate_steps=2", "trainer.ema=0.9"]
    straight, split, log = tmp_path / "straight", tmp_path / "split", tmp_path / "log"
    assert _esper_train(straight, *items, log=log) == 0, log.read_text()
    stopped = _esper_train(split, *items, log=log, flags=("--fault", "sigterm@4:3"))  # inside a window
    assert stopped == ExitCode.SIGTERM, log.read_text()
    assert finish(spawn_resume(split, *items, log=log, env=GPU_ENV), log, timeout=300) == 0, log.read_text()
    for stem in ("model", "optimizer", "ema", "rng"):
        assert_same_tensors(tensors(latest(straight), stem), tensors(latest(split), stem))
    assert metrics_without_wall_clock(split) == metrics_without_wall_clock(straight)


@pytest.mark.gpu
def test_a_nan_rolls_back_from_gpu_memory_on_the_fast_tier(tmp_path: Path) -> None:
    run, log = tmp_path / "run", tmp_path / "log"
    assert _esper_train(run, *CUDA_JOB, log=log, flags=("--fault", "nan_loss@3:2")) == 0, log.read_text()
    [done] = [e for e in events(run) if e["event"] == "rollback.completed"]
    assert done["attributes"]["tier"] == "fast" and done["attributes"]["fell_through"] is False


@pytest.mark.gpu
def test_a_rollback_falls_through_to_the_full_tier_on_cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    break_fast_tier(monkeypatch)
    run = tmp_path / "run"
    r = train(run, *CUDA_JOB, extra=["--fault", "nan_loss@3:2"])
    assert r.exit_code == 0, out(r)
    [done] = [e for e in events(run) if e["event"] == "rollback.completed"]
    assert done["attributes"]["tier"] == "full"


@pytest.mark.gpu
def test_async_checkpoints_of_a_cuda_run_verify(tmp_path: Path) -> None:
    run, log = tmp_path / "run", tmp_path / "log"
    assert _esper_train(run, *CUDA_JOB, "checkpoint.async=true", log=log) == 0, log.read_text()
    assert verify(run).exit_code == 0 and summary(run)["status"] == "COMPLETED"


@pytest.mark.gpu(2)
def test_two_ranks_on_nccl_hold_the_same_lifecycle(tmp_path: Path) -> None:
    run, log = tmp_path / "run", tmp_path / "log"
    assert _esper_train(run, *CUDA_JOB, log=log, flags=("--nproc", "2")) == 0, log.read_text()
    assert summary(run)["status"] == "COMPLETED"
    assert summary(run / "rank-1")["seeds"] == summary(run)["seeds"]
