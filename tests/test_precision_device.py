"""run.device and run.precision (issue 14, Deliver 4 and 5): a device torch cannot use is exit 3 before any
run dir is written; bf16 trains and resumes exactly on CPU; fp16's loss scaler is checkpointed, restored and
its skipped steps counted, never an emergency, while a non-finite loss still is."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import (
    GROWING,
    SHIPPED,
    esper,
    events,
    latest,
    make_config,
    manifest,
    metrics_without_wall_clock,
    out,
    resume,
    summary,
    train,
)

from esper.core.errors import ExitCode
from esper.core.records.rundir import RunDir
from esper.core.tolaria.safety import Restart
from esper.core.tolaria.train_state import EpochStats
from esper.core.tolaria.trainer import Trainer

CPU_ONLY = not torch.cuda.is_available()


@pytest.mark.skipif(not CPU_ONLY, reason="needs a torch without a usable CUDA device")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_a_cuda_device_on_a_cpu_only_torch_is_exit_3_naming_the_key_before_any_run_dir(device: str,
                                                                                       tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = train(run, f'run.device="{device}"', "trainer.epochs=1")
    assert r.exit_code == ExitCode.CONFIG, out(r)
    text = out(r)
    assert f"run.device = '{device}'" in text and "Torch not compiled with CUDA enabled" in text
    assert "Traceback" not in text
    assert not run.exists()  # nothing written: no run dir, no config, no events
    v = esper("config", "validate", "--set", f'run.device="{device}"')
    assert v.exit_code == ExitCode.CONFIG and f"run.device = '{device}'" in out(v)


def test_mps_on_a_torch_without_it_is_exit_3(tmp_path: Path) -> None:
    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    r = train(tmp_path / "run", 'run.device="mps"')
    assert r.exit_code == ExitCode.CONFIG and "run.device = 'mps'" in out(r) and "MPS" in out(r)


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "cuda:", "CPU", "tpu"])
def test_device_values_outside_the_schema_are_config_errors(bad: str) -> None:
    r = esper("config", "validate", "--set", f'run.device="{bad}"')
    assert r.exit_code == ExitCode.CONFIG and "run.device" in out(r)


def test_cpu_and_every_precision_validate_on_cpu() -> None:
    for precision in ("fp32", "bf16", "fp16"):
        r = esper("config", "validate", "--set", f'run.precision="{precision}"')
        assert r.exit_code == 0, out(r)
    r = esper("config", "validate", "--set", 'run.precision="fp8"')
    assert r.exit_code == ExitCode.CONFIG and "run.precision" in out(r)


@pytest.mark.slow
def test_bf16_trains_with_growing_seeds_and_resumes_bit_exactly_on_cpu(tmp_path: Path) -> None:
    precision = 'run.precision="bf16"'
    straight, split = tmp_path / "straight", tmp_path / "split"
    r = train(straight, *GROWING, precision, "trainer.epochs=6", 'trainer.lr_policy="constant"')
    assert r.exit_code == 0, out(r)
    r = train(split, *GROWING, precision, "trainer.epochs=3", 'trainer.lr_policy="constant"')
    assert r.exit_code == 0, out(r)
    r = resume(split, *GROWING, precision, "trainer.epochs=6", 'trainer.lr_policy="constant"',
               allow=["trainer.epochs"])
    assert r.exit_code == 0, out(r)
    assert metrics_without_wall_clock(split) == metrics_without_wall_clock(straight)
    rows = metrics_without_wall_clock(straight)
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]  # it learns
    stages = {r["stage"] for r in summary(straight)["seeds"]}
    assert stages - {"DORMANT"}, "a seed grows under bf16 too"
    assert summary(straight)["precision"] == {"mode": "bf16", "overflow_steps": 0}
    # bf16 actually ran: the same job in fp32 reaches other numbers
    fp32 = tmp_path / "fp32"
    assert train(fp32, *GROWING, "trainer.epochs=1", 'trainer.lr_policy="constant"').exit_code == 0
    assert metrics_without_wall_clock(fp32)[0]["train_loss"] != rows[0]["train_loss"]


@pytest.mark.slow
def test_fp16_scaler_state_is_checkpointed_and_restored_on_resume(tmp_path: Path) -> None:
    fp16 = 'run.precision="fp16"'
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train(straight, *GROWING, fp16, "trainer.epochs=4").exit_code == 0
    assert train(split, *GROWING, fp16, "trainer.epochs=2", "trainer.cosine_t_max=0").exit_code == 0
    scaler = manifest(latest(split))["precision"]["scaler"]
    assert scaler["scale"] > 0 and set(scaler) >= {"scale", "growth_factor", "_growth_tracker"}
    r = resume(split, *GROWING, fp16, "trainer.epochs=4", "trainer.cosine_t_max=0",
               allow=["trainer.epochs", "trainer.cosine_t_max"])
    assert r.exit_code == 0, out(r)
    tracker = manifest(latest(split))["precision"]["scaler"]["_growth_tracker"]
    # the tracker counts steps since the last scale change: restored, it keeps counting across the resume
    assert tracker == manifest(latest(straight))["precision"]["scaler"]["_growth_tracker"] > 0


def _trainer(tmp_path: Path, *sets: str) -> Trainer:
    cfg = make_config(*GROWING, 'run.precision="fp16"', *sets)
    return Trainer(cfg, RunDir.create(cfg, tmp_path / "run"), controller_factory=None)


def test_an_fp16_overflow_skips_the_step_counts_it_and_is_no_emergency(tmp_path: Path) -> None:
    tr = _trainer(tmp_path)
    try:
        p = tr.build()
        tr.machine.fire("ready", reason="test")
        assert p.precision.scaler is not None
        state = p.precision.state_dict()
        state["scaler"] = {**state["scaler"], "scale": 3.0e38}  # any real gradient times this is inf in fp32
        p.precision.load_state_dict(state)
        before = {k: v.detach().clone() for k, v in p.host.state_dict().items()}
        stats = EpochStats()
        assert tr.train_step(*p.probe, stats)
        assert all(torch.equal(before[k], v) for k, v in p.host.state_dict().items())  # the step was skipped
        assert p.precision.overflow_steps == 1 and p.precision.scaler.get_scale() == pytest.approx(1.5e38)
        assert p.emergency.level == "NOMINAL" and stats.skipped == 0
        tr.emitter.flush()
        (ev,) = [e for e in events(tmp_path / "run") if e["event"] == "step.overflow"]
        assert ev["level"] == "WARNING" and ev["attributes"]["overflow_steps"] == 1
        tr.train_step(*p.probe, stats)
        assert p.precision.overflow_steps == 2 and p.precision.scaler.get_scale() == pytest.approx(0.75e38)
        p.precision.load_state_dict({**p.precision.state_dict(),
                                     "scaler": {**p.precision.state_dict()["scaler"], "scale": 1024.0}})
        tr.train_step(*p.probe, stats)
        assert p.precision.overflow_steps == 2 and math.isfinite(p.precision.scaler.get_scale())
        assert any(not torch.equal(before[k], v) for k, v in p.host.state_dict().items())  # it trains again
    finally:
        tr.close()


def test_fp16_overflows_many_steps_in_a_row_are_an_emergency_not_a_silent_skip(tmp_path: Path) -> None:
    tr = _trainer(tmp_path, "emergency.max_overflow_steps=3")
    try:
        p = tr.build()
        tr.machine.fire("ready", reason="test")
        tr.machine.fire("train", reason="test")
        p.rollback.take()  # the last-known-good state the emergency rolls back to
        assert p.precision.scaler is not None
        # a gradient that is non-finite whatever the scale (a bug, not a range problem)
        hook = p.host.parameters().__next__().register_hook(lambda g: torch.full_like(g, float("inf")))
        stats = EpochStats()
        assert tr.train_step(*p.probe, stats) and tr.train_step(*p.probe, stats)  # counted, skipped, no emergency
        assert p.emergency.level == "NOMINAL" and p.precision.in_a_row == 2
        with pytest.raises(Restart):  # the third in a row: not applied, ELEVATED, rolled back to last-known-good
            tr.train_step(*p.probe, stats)
        assert p.emergency.level == "ELEVATED" and stats.skipped == 1
        assert p.precision.in_a_row == 0 and len(p.state.rollbacks) == 1
        hook.remove()
        assert tr.train_step(*p.probe, stats) and p.precision.in_a_row == 0  # it trains again
        tr.emitter.flush()
        (skip,) = [e for e in events(tmp_path / "run") if e["event"] == "step.skipped"]
        assert skip["attributes"]["cause"] == "non_finite_gradient"
        (level,) = [e for e in events(tmp_path / "run") if e["event"] == "emergency.level"]
        assert "3 steps in a row" in level["attributes"]["transition"]["reason"]
    finally:
        tr.close()


def test_a_non_finite_loss_is_still_an_emergency_under_fp16(tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = train(run, *GROWING, 'run.precision="fp16"', "trainer.epochs=2", extra=["--fault", "nan_loss@1:2"])
    assert r.exit_code == 0, out(r)
    levels = [e["attributes"]["to_level"] for e in events(run) if e["event"] == "emergency.level"]
    assert "ELEVATED" in levels
    assert summary(run)["precision"]["overflow_steps"] == 0


def test_a_hostile_scaler_state_is_refused(tmp_path: Path) -> None:
    tr = _trainer(tmp_path)
    try:
        p = tr.build()
        for bad in ({"scaler": {"scale": float("nan")}, "overflow_steps": 0}, {"scaler": None, "overflow_steps": -1},
                    {"scaler": "x", "overflow_steps": 0}, {"overflow_steps": True}):
            with pytest.raises(Exception, match="checkpoint precision"):
                p.precision.load_state_dict(bad)
    finally:
        tr.close()


def test_shipped_config_documents_the_new_keys() -> None:
    text = SHIPPED.read_text()
    for key in ("precision =", "device =", "block_size =", "d_model =", "betas ="):
        assert key in text
