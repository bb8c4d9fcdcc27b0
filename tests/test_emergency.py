"""Emergency handling (SPEC §3.4 L-4, §5 C-6; issue 5): the level machine's rules, the two-tier rollback with its
fall-through and SLA, consecutive rollbacks, CONSERVATIVE's pause, and escalation events that survive SIGKILL.

In-process runs build a real Trainer on a tiny synthetic task (3 steps per epoch); faults act through the real
code paths (a real NaN in the loss), never by calling the handler directly.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (
    BASE_TOML,
    EventRecorder,
    break_fast_tier,
    esper,
    make_config,
    out,
    reported,
    session_pids,
    sets,
    spawn,
    tensors,
    wait_for,
    wait_until,
)
from conftest import events as run_events

from esper.app.drill import drill_config, run_drill
from esper.core import config as config_mod
from esper.core.checkpoint import verify_checkpoint
from esper.core.config import EsperConfig
from esper.core.errors import CheckpointError, ExitCode
from esper.core.records.rundir import RunDir
from esper.core.tolaria import rollback as rollback_mod
from esper.core.tolaria.emergency import LEVELS, EmergencyManager, UnknownLevel, level_value
from esper.core.tolaria.rollback import (
    FastSnapshot,
    RollbackResult,
    StructureChanged,
    live_tensors,
)
from esper.core.tolaria.train_state import EpochStats, Position
from esper.core.tolaria.trainer import Trainer
from esper.statemachines import IllegalTransition, LifecycleError

# 256 samples, 25% held out, batch 64: 3 steps per epoch. Wall-clock budgets lifted so a busy box cannot trip a
# slow_step NOTICE or a latency gate and change the level history under test.
BASE: dict[str, Any] = {
    "data": {"task": "synthetic", "synthetic_samples": 256},
    "trainer": {"epochs": 3},
    "controller": {"isolation": "inline", "timeout_ms": 120000, "risk": {"max_step_latency_ms": 600000.0}},
    "seeds": {"max_step_latency_ms": 600000.0},
    "emergency": {"slow_step_ms": 600000.0},
}

Tensors = dict[str, torch.Tensor]
# Where the SLA is not what a test is about: a descheduled process on a busy box must not turn a rollback into HALT.
UNHURRIED_ROLLBACK = "rollback.fast_sla_ms=600000.0"


def config(*overrides: str, faults: tuple[tuple[str, str], ...] = ()) -> EsperConfig:
    return make_config(*overrides, base={**BASE, "faults": [{"name": n, "at": at} for n, at in faults]})


def make_trainer(tmp_path: Path, *overrides: str, faults: tuple[tuple[str, str], ...] = ()) -> Trainer:
    """A trainer without a controller (no decisions, no worker process): emergencies only."""
    cfg = config(*overrides, faults=faults)
    return Trainer(cfg, RunDir.create(cfg, tmp_path / "run"), controller_factory=None)


def clone(t: Tensors) -> Tensors:
    return {k: v.detach().clone() for k, v in t.items()}


def assert_equal_tensors(a: Tensors, b: Tensors) -> None:
    assert sorted(a) == sorted(b)
    differing = [k for k in a if not (a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]))]
    assert not differing, f"tensors differ: {differing}"


def level_changes(events: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(e["attributes"]["from_level"], e["attributes"]["to_level"], e["attributes"]["transition"]["trigger"])
            for e in events if e["event"] == "emergency.level"]


def model_of(run: Path, name: str) -> Tensors:
    return tensors(run / "checkpoints" / name, "model")


def live(tr: Trainer) -> Tensors:
    assert tr.parts is not None
    return live_tensors(tr.parts.components)


def live_model(tr: Trainer) -> Tensors:
    """Live model tensors under checkpoint names (``host.*``, ``seed.*``)."""
    return {k.removeprefix("model/"): v.detach().clone() for k, v in live(tr).items() if k.startswith("model/")}


class RollbackSpy:
    """Wraps a trainer's rollback manager: clones of the live state at every ``take`` and around every rollback."""

    def __init__(self, tr: Trainer) -> None:
        self.tr = tr
        self.taken: list[tuple[Position, Tensors]] = []
        self.calls: list[dict[str, Any]] = []
        real_build = tr.build

        def build() -> Any:  # the manager exists once the parts are built: wrap it then
            parts = real_build()
            mgr = parts.rollback
            self._take, self._rollback = mgr.take, mgr.rollback
            mgr.take = self.take  # type: ignore[method-assign]
            mgr.rollback = self.rollback  # type: ignore[method-assign]
            return parts

        tr.build = build  # type: ignore[method-assign]

    def take(self) -> None:
        self._take()
        assert self.tr.parts is not None and self.tr.parts.rollback.position is not None
        self.taken.append((self.tr.parts.rollback.position, clone(live(self.tr))))

    def rollback(self, reason: str) -> RollbackResult:
        assert self.tr.parts is not None
        before = clone(live(self.tr))
        ptrs = {k: v.data_ptr() for k, v in live(self.tr).items()}
        snapshot_index = len(self.taken) - 1
        result = self._rollback(reason)
        after = live(self.tr)
        self.calls.append({
            "result": result, "before": before, "after": clone(after), "model": live_model(self.tr),
            "buffers": clone(self.tr.parts.rollback.snapshot.buffers), "snapshot_index": snapshot_index,
            "same_storage": {k: v.data_ptr() == ptrs.get(k) for k, v in after.items()},
            "global_step": self.tr.parts.state.global_step,
        })
        return result


# ----------------------------------------------------------------------------------------- level machine rules


def manager(recovery_epochs: int = 2) -> tuple[EmergencyManager, EventRecorder]:
    rec = EventRecorder()
    cfg = config(f"emergency.recovery_epochs={recovery_epochs}").emergency
    return EmergencyManager(cfg, rec), rec


@pytest.mark.parametrize("bad", ["BOGUS", "elevated", "", "HALTED", "NOMINAL "])
def test_an_unknown_level_is_rejected_and_changes_nothing(bad: str) -> None:
    em, rec = manager()
    with pytest.raises(UnknownLevel, match="unknown emergency level"):
        level_value(bad)
    with pytest.raises(UnknownLevel):
        em.escalate(bad, "a detector with a typo")
    assert em.level == "NOMINAL"
    assert rec.events == []
    assert not em.incident_epoch_unhealthy  # a rejected signal opens no incident


def test_levels_are_the_five_of_the_spec_in_order() -> None:
    assert list(LEVELS) == ["NOMINAL", "NOTICE", "ELEVATED", "CONSERVATIVE", "HALT"]
    assert [level_value(lv) for lv in LEVELS] == sorted(level_value(lv) for lv in LEVELS)


def test_escalation_is_critical_and_carries_both_levels_and_the_reason() -> None:
    em, rec = manager()
    assert em.escalate("ELEVATED", "non_finite_loss: training loss is nan") is True
    assert em.level == "ELEVATED"
    [(_, event, level, attrs)] = rec.events
    assert (event, level) == ("emergency.level", "CRITICAL")
    assert (attrs["from_level"], attrs["to_level"]) == ("NOMINAL", "ELEVATED")
    assert attrs["transition"]["trigger"] == "raise_elevated"
    assert attrs["transition"]["reason"] == "non_finite_loss: training loss is nan"


@pytest.mark.parametrize("lower", ["NOTICE", "ELEVATED", "CONSERVATIVE"])
def test_a_lower_or_equal_signal_never_lowers_the_level_it_is_an_emergency_signal_event(lower: str) -> None:
    em, rec = manager()
    em.escalate("CONSERVATIVE", "controller_timeout: decision abandoned")
    rec.events.clear()
    assert em.escalate(lower, "a later, milder problem", cause="x") is False
    assert em.level == "CONSERVATIVE"
    assert rec.named("emergency.level") == []
    [(_, _, level, attrs)] = rec.all("emergency.signal")
    assert level == "WARNING"
    assert (attrs["signal_level"], attrs["current"], attrs["reason"]) == (lower, "CONSERVATIVE",
                                                                         "a later, milder problem")
    assert em.incident_epoch_unhealthy  # the milder signal still makes the epoch unhealthy


def test_escalation_is_monotonic_up_to_halt_which_is_terminal() -> None:
    em, _ = manager()
    for lv in ("NOTICE", "ELEVATED", "CONSERVATIVE", "HALT"):
        assert em.escalate(lv, f"to {lv}") is True
        assert em.level == lv
    assert [h["trigger"] for h in em.history()] == ["raise_notice", "raise_elevated", "raise_conservative",
                                                    "raise_halt"]
    with pytest.raises(IllegalTransition):
        em.downgrade("operator wants to continue")
    with pytest.raises(IllegalTransition):
        em.downgrade("operator wants to continue", clear=True)
    for _ in range(5):
        em.end_epoch()  # healthy epochs never clear HALT
    assert em.level == "HALT"


def test_an_explicit_downgrade_goes_one_level_down_and_is_a_critical_event() -> None:
    em, rec = manager()
    em.escalate("CONSERVATIVE", "controller_crash")
    rec.events.clear()
    em.downgrade("operator: controller replaced")
    assert em.level == "ELEVATED"
    [(_, event, level, attrs)] = rec.events
    assert (event, level) == ("emergency.level", "CRITICAL")
    assert (attrs["from_level"], attrs["to_level"]) == ("CONSERVATIVE", "ELEVATED")
    assert (attrs["transition"]["trigger"], attrs["transition"]["reason"]) == ("downgrade",
                                                                               "operator: controller replaced")
    em.downgrade("operator: all clear", clear=True)
    assert em.level == "NOMINAL"
    assert rec.events[-1].attributes["transition"]["trigger"] == "clear"


@pytest.mark.parametrize("reason", ["", "   "])
def test_a_downgrade_without_a_reason_is_refused(reason: str) -> None:
    em, rec = manager()
    em.escalate("ELEVATED", "nan")
    rec.events.clear()
    with pytest.raises(LifecycleError, match="needs a reason"):
        em.downgrade(reason)
    with pytest.raises(LifecycleError, match="needs a reason"):
        em.downgrade(reason, clear=True)
    assert em.level == "ELEVATED" and rec.events == []


def test_nothing_to_downgrade_at_nominal() -> None:
    em, _ = manager()
    with pytest.raises(IllegalTransition):
        em.downgrade("nothing happened")
    with pytest.raises(IllegalTransition):
        em.downgrade("nothing happened", clear=True)


@pytest.mark.parametrize("recovery", [1, 2, 3])
def test_policy_clears_only_after_recovery_epochs_healthy_epochs(recovery: int) -> None:
    em, rec = manager(recovery)
    em.escalate("CONSERVATIVE", "controller_timeout")
    em.end_epoch()  # the incident's own epoch is unhealthy
    assert em.level == "CONSERVATIVE" and not em.last_epoch_healthy
    for i in range(recovery - 1):
        em.end_epoch()
        assert em.level == "CONSERVATIVE", f"cleared after {i + 1} of {recovery} healthy epochs"
    rec.events.clear()
    em.end_epoch()
    assert em.level == "NOMINAL"
    [(_, event, level, attrs)] = rec.events
    assert (event, level) == ("emergency.level", "CRITICAL")
    assert attrs["transition"]["trigger"] == "clear"
    assert f"{recovery} healthy epoch" in attrs["transition"]["reason"]


def test_a_new_signal_restarts_the_recovery_count() -> None:
    em, _ = manager(2)
    em.escalate("ELEVATED", "nan")
    em.end_epoch()
    em.end_epoch()  # one healthy epoch
    em.escalate("NOTICE", "slow step")  # lower: no level change, but the epoch is not healthy
    em.end_epoch()
    assert em.level == "ELEVATED"
    em.end_epoch()
    assert em.level == "ELEVATED"  # only one healthy epoch since the last signal
    em.end_epoch()
    assert em.level == "NOMINAL"


def test_consecutive_rollbacks_reset_only_on_a_healthy_epoch() -> None:
    em, _ = manager()
    em.escalate("ELEVATED", "nan")
    em.record_rollback()
    em.record_rollback()
    em.end_epoch()  # unhealthy
    assert em.consecutive_rollbacks == 2
    em.end_epoch()
    assert em.consecutive_rollbacks == 0


def test_state_dict_round_trips_and_a_resumed_halt_starts_a_fresh_incident_keeping_history() -> None:
    em, _ = manager()
    em.escalate("ELEVATED", "nan")
    em.record_rollback()
    other, _ = manager()
    other.load_state_dict(json.loads(json.dumps(em.state_dict())))
    assert (other.level, other.consecutive_rollbacks, other.history()) == ("ELEVATED", 1, em.history())
    em.escalate("HALT", "too many")
    resumed, _ = manager()
    resumed.load_state_dict(json.loads(json.dumps(em.state_dict())))
    assert resumed.level == "NOMINAL"
    assert [h["dest"] for h in resumed.history()] == ["ELEVATED", "HALT"]


# -------------------------------------------------------------------------------------- fast snapshot buffers


def test_fast_snapshot_preallocates_once_and_restores_in_place() -> None:
    live = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)}
    snap = FastSnapshot()
    snap.capture(live)
    assert snap.allocations == 2 and snap.nbytes == 9 * 4
    buffers = {k: v.data_ptr() for k, v in snap.buffers.items()}
    original = clone(live)
    live["w"].add_(5.0)
    assert not torch.equal(snap.buffers["w"], live["w"])  # a copy, not a view of the live tensor
    snap.capture(live)  # same shapes: reuses the buffers
    assert snap.allocations == 2
    assert {k: v.data_ptr() for k, v in snap.buffers.items()} == buffers
    snap.capture(original)
    ptr = live["w"].data_ptr()
    live["w"].mul_(-1.0)
    snap.restore_into(live)
    assert live["w"].data_ptr() == ptr
    assert_equal_tensors(live, original)


def test_fast_snapshot_refuses_a_changed_structure_and_touches_nothing() -> None:
    snap = FastSnapshot()
    snap.capture({"w": torch.zeros(2, 3)})
    grown = {"w": torch.full((2, 3), 7.0), "seed.s1.w": torch.ones(3)}
    with pytest.raises(StructureChanged, match="new"):
        snap.restore_into(grown)
    assert torch.equal(grown["w"], torch.full((2, 3), 7.0))
    reshaped = {"w": torch.full((3, 3), 7.0)}
    with pytest.raises(StructureChanged, match="shape"):
        snap.restore_into(reshaped)
    assert torch.equal(reshaped["w"], torch.full((3, 3), 7.0))
    snap.capture({"w": torch.zeros(3, 3)})  # a shape change re-allocates
    assert snap.allocations == 2


# ------------------------------------------------------------------------------------------- two-tier rollback


@pytest.mark.slow
def test_nan_loss_rolls_back_in_place_to_exactly_the_last_known_good_snapshot(tmp_path: Path) -> None:
    # the SLA is lifted here (a descheduled process must not turn this into HALT); the drill test checks 500 ms
    tr = make_trainer(tmp_path, UNHURRIED_ROLLBACK, faults=(("nan_loss", "2:1"),))
    spy = RollbackSpy(tr)
    summary = tr.run()
    assert (summary["status"], summary["exit_code"]) == ("COMPLETED", 0), summary["failure"]
    [call] = spy.calls
    result: RollbackResult = call["result"]
    assert (result.tier, result.path, result.fell_through) == ("fast", "in_place", None)
    assert result.within_sla and result.within_sla == (result.latency_ms <= result.sla_ms)
    assert result.deadline_missed_at_ms is None
    pos, at_take = spy.taken[call["snapshot_index"]]
    assert pos == Position(1, 0, 3)  # the healthy boundary after epoch 1
    assert result.position == {"epochs_done": 1, "step_in_epoch": 0, "global_step": 3}
    # weights, optimizer state: equal to the snapshot buffers, which still hold what was live at the boundary
    assert_equal_tensors(call["after"], call["buffers"])
    assert_equal_tensors(call["after"], at_take)
    assert any(k.startswith("optimizer/") for k in at_take)  # momentum buffers are part of last-known-good
    # epoch 2 step 0 was applied before the NaN at step 1, so the rollback really changed something...
    assert any(not torch.equal(call["before"][k], at_take[k]) for k in at_take if k.startswith("model/"))
    # ...by copying into the live tensors, not by replacing them
    assert all(call["same_storage"].values())
    assert call["global_step"] == 3  # the bad step was never applied: the counter is last-known-good's
    [record] = summary["rollbacks"]
    assert (record["cause"], record["epoch"], record["global_step_before"]) == ("non_finite_loss", 2, 4)
    events = run_events(tr.run_dir.path)
    names = [e["event"] for e in events]
    skipped = names.index("step.skipped")
    assert names[skipped + 1] == "emergency.level"  # announced before the rollback it triggers
    assert names.index("rollback.completed") > skipped + 1


@pytest.mark.slow
def test_a_rollback_across_a_germination_restores_structurally_and_the_seed_is_gone(tmp_path: Path) -> None:
    tr = make_trainer(tmp_path)
    try:
        p = tr.build()
        tr.machine.fire("ready", reason="test")
        p.rollback.take()
        tr.train_step(*p.probe, EpochStats())  # optimizer state appears, weights move
        p.rollback.take()
        good = clone(live(tr))
        good_stages = {n: s.stage for n, s in p.kasmina.slots.items()}
        p.kasmina.germinate("s1", "residual_mlp", "test: structure changes after the snapshot")
        p.optimizer.rebuild("test germination")
        tr.train_step(*p.probe, EpochStats())
        assert p.kasmina.slots["s1"].module is not None
        assert any(k.startswith("model/seed.s1.") for k in live(tr))
        result = p.rollback.rollback("test")
        assert (result.tier, result.path, result.fell_through) == ("fast", "structural", None)
        s1 = p.kasmina.slots["s1"]
        assert (s1.module, s1.blueprint, s1.stage) == (None, None, "DORMANT")
        assert {n: s.stage for n, s in p.kasmina.slots.items()} == good_stages
        assert_equal_tensors(clone(live(tr)), good)
        assert p.state.global_step == 1
        # the optimizer only holds the live parameters again
        opt_params = {id(q) for g in p.optimizer.optimizer.param_groups for q in g["params"]}
        assert opt_params == {id(q) for q in p.host.parameters()}
    finally:
        tr.close()


@pytest.mark.slow
def test_a_failing_fast_tier_falls_through_to_the_last_verified_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    break_fast_tier(monkeypatch)
    tr = make_trainer(tmp_path, faults=(("nan_loss", "2:1"),))
    spy = RollbackSpy(tr)
    summary = tr.run()
    assert (summary["status"], summary["exit_code"]) == ("COMPLETED", 0), summary["failure"]
    [call] = spy.calls
    result: RollbackResult = call["result"]
    run = tr.run_dir.path
    assert result.tier == "full"
    assert result.path == str(run / "checkpoints" / "epoch-0001")
    assert result.fell_through is not None and result.fell_through.startswith("RollbackError")
    assert "structural restore failed" in result.fell_through
    assert result.sla_ms == 12000.0 and result.within_sla
    assert result.position == {"epochs_done": 1, "step_in_epoch": 0, "global_step": 3}
    assert_equal_tensors(call["model"], model_of(run, "epoch-0001"))
    events = run_events(run)
    [failed] = [e for e in events if e["event"] == "rollback.fast_failed"]
    assert "structural restore failed" in failed["attributes"]["error"]
    [done] = [e for e in events if e["event"] == "rollback.completed"]
    assert (done["attributes"]["tier"], done["attributes"]["fell_through"]) == ("full", result.fell_through)
    assert failed["seq"] < done["seq"]


@pytest.mark.slow
def test_when_the_full_tier_fails_too_the_run_halts_with_exit_6(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    break_fast_tier(monkeypatch)

    def unreadable(path: Path) -> Any:
        raise CheckpointError(f"test: {path} cannot be read")

    monkeypatch.setattr(rollback_mod, "load_checkpoint", unreadable)
    tr = make_trainer(tmp_path, faults=(("nan_loss", "2:1"),))
    summary = tr.run()
    assert (summary["status"], summary["exit_code"]) == ("HALTED", int(ExitCode.HALTED))
    assert summary["rollbacks"] == []  # no rollback completed
    events = run_events(tr.run_dir.path)
    failed = [e for e in events if e["event"] == "rollback.failed"]
    assert failed and failed[0]["level"] == "CRITICAL" and "cannot be read" in failed[0]["attributes"]["error"]
    assert ("ELEVATED", "HALT", "raise_halt") in level_changes(events)
    halt = next(e for e in events if e["event"] == "emergency.level" and e["attributes"]["to_level"] == "HALT")
    halted = next(e for e in events if e["event"] == "trainer.transition"
                  and e["attributes"]["transition"]["dest"] == "HALTED")
    assert failed[0]["seq"] < halt["seq"] < halted["seq"]
    # the checkpoint of epoch 1 is untouched and still what `latest` names
    ckpts = tr.run_dir.checkpoints
    assert (ckpts / "latest").read_text().strip() == "epoch-0001"
    assert verify_checkpoint(ckpts / "epoch-0001").ok


@pytest.mark.slow
def test_a_rollback_over_its_sla_escalates_to_halt_with_the_missed_deadline(tmp_path: Path) -> None:
    tr = make_trainer(tmp_path, "rollback.fast_sla_ms=0.000001", faults=(("nan_loss", "2:1"),))
    summary = tr.run()
    assert (summary["status"], summary["exit_code"]) == ("HALTED", int(ExitCode.HALTED))
    [record] = summary["rollbacks"]
    assert (record["tier"], record["within_sla"]) == ("fast", False)
    assert record["latency_ms"] > record["sla_ms"] == 0.000001
    events = run_events(tr.run_dir.path)
    done = next(e for e in events if e["event"] == "rollback.completed")
    assert done["level"] == "CRITICAL"
    started = next(e for e in events if e["event"] == "trainer.transition"
                   and e["attributes"]["transition"]["dest"] == "ROLLING_BACK")
    # the deadline is a point on the monotonic clock: after the rollback started, before it was reported
    missed = record["deadline_missed_at_ms"]
    assert missed is not None
    assert started["monotonic_ms"] <= missed <= done["monotonic_ms"]
    halt = next(e for e in events if e["event"] == "emergency.level" and e["attributes"]["to_level"] == "HALT")
    assert "SLA" in halt["attributes"]["transition"]["reason"]
    assert done["seq"] < halt["seq"]
    # HALT: an emergency checkpoint of last-known-good (the end of epoch 1), which verifies
    run = tr.run_dir.path
    emergency_ckpt = run / "checkpoints" / "epoch-0001-emergency"
    assert verify_checkpoint(emergency_ckpt).ok
    assert_equal_tensors(model_of(run, "epoch-0001-emergency"), model_of(run, "epoch-0001"))
    assert summary["checkpoint"] == str(emergency_ckpt)


# ------------------------------------------------------------------------------------- consecutive rollbacks


@pytest.mark.slow
def test_max_consecutive_rollbacks_pauses_and_the_run_recovers(tmp_path: Path) -> None:
    tr = make_trainer(tmp_path, "trainer.epochs=4", "emergency.max_consecutive_rollbacks=2", UNHURRIED_ROLLBACK,
                      "emergency.recovery_epochs=2", faults=(("nan_loss", "2:0"), ("nan_loss", "2:1")))
    summary = tr.run()
    assert (summary["status"], summary["exit_code"]) == ("COMPLETED", 0), summary["failure"]
    assert len(summary["rollbacks"]) == 2
    events = run_events(tr.run_dir.path)
    assert level_changes(events) == [("NOMINAL", "ELEVATED", "raise_elevated"),
                                     ("ELEVATED", "CONSERVATIVE", "raise_conservative"),
                                     ("CONSERVATIVE", "NOMINAL", "clear")]
    conservative = next(e for e in events if e["event"] == "emergency.level"
                        and e["attributes"]["to_level"] == "CONSERVATIVE")
    assert "2 rollbacks without a healthy epoch" in conservative["attributes"]["transition"]["reason"]
    clear = next(e for e in events if e["event"] == "emergency.level" and e["attributes"]["to_level"] == "NOMINAL")
    assert clear["epoch"] == 4  # epoch 2 had the incident; epochs 3 and 4 were the two healthy ones
    suspended = [e["epoch"] for e in events if e["event"] == "controller.suspended"]
    assert suspended == [2, 3, 4]
    paused = [e for e in events if e["event"] == "trainer.transition"
              and e["attributes"]["transition"]["dest"] == "PAUSED"]
    assert paused and paused[0]["seq"] > conservative["seq"]
    rows = [json.loads(line) for line in tr.run_dir.metrics.read_text().splitlines()]
    assert [r["emergency_level"] for r in rows] == ["NOMINAL", "CONSERVATIVE", "CONSERVATIVE", "NOMINAL"]
    # the host kept training while paused; batches 0 and 1 of epoch 2 raised the rollbacks: left out of the replay
    assert [r["global_step"] for r in rows] == [3, 4, 7, 10]
    assert [(s["epoch"], s["step"], s["cause"]) for s in summary["skipped_batches"]] == [
        (2, 0, "non_finite_loss"), (2, 1, "non_finite_loss")]


@pytest.mark.slow
def test_one_rollback_past_the_limit_halts_with_an_emergency_checkpoint_of_last_known_good(tmp_path: Path) -> None:
    tr = make_trainer(tmp_path, "emergency.max_consecutive_rollbacks=2", UNHURRIED_ROLLBACK,
                      faults=(("nan_loss", "2:0"), ("nan_loss", "2:1"), ("nan_loss", "2:2")))
    summary = tr.run()
    assert (summary["status"], summary["exit_code"]) == ("HALTED", int(ExitCode.HALTED))
    assert len(summary["rollbacks"]) == 3
    events = run_events(tr.run_dir.path)
    assert level_changes(events) == [("NOMINAL", "ELEVATED", "raise_elevated"),
                                     ("ELEVATED", "CONSERVATIVE", "raise_conservative"),
                                     ("CONSERVATIVE", "HALT", "raise_halt")]
    # the second NaN arrived at ELEVATED, the third while CONSERVATIVE: signals, recorded, not level changes
    signals = [e for e in events if e["event"] == "emergency.signal"]
    assert [(s["attributes"]["signal_level"], s["attributes"]["current"]) for s in signals] == [
        ("ELEVATED", "ELEVATED"), ("ELEVATED", "CONSERVATIVE")]
    halt = next(e for e in events if e["event"] == "emergency.level" and e["attributes"]["to_level"] == "HALT")
    assert "3 rollbacks without a healthy epoch" in halt["attributes"]["transition"]["reason"]
    run = tr.run_dir.path
    assert verify_checkpoint(run / "checkpoints" / "epoch-0001-emergency").ok
    assert_equal_tensors(model_of(run, "epoch-0001-emergency"), model_of(run, "epoch-0001"))
    written = [e for e in events if e["event"] == "checkpoint.written"]
    assert written[-1]["attributes"]["reason"] == "emergency" and written[-1]["seq"] > halt["seq"]


@pytest.mark.slow
def test_an_epoch_redone_after_a_rollback_writes_its_checkpoint_again(tmp_path: Path) -> None:
    """Epoch 2 has an incident (so no snapshot at its end, but its checkpoint is written); a NaN in epoch 3 rolls
    back to the end of epoch 1 and epoch 2 is trained again. Its checkpoint must then be written like any other,
    not refused as an overwrite of `latest` (a CRITICAL checkpoint.failed and a NOTICE for a healthy write)."""
    tr = make_trainer(tmp_path, "trainer.epochs=4", "emergency.max_consecutive_rollbacks=5", UNHURRIED_ROLLBACK,
                      faults=(("nan_loss", "2:1"), ("nan_loss", "3:1")))
    summary = tr.run()
    assert (summary["status"], summary["exit_code"]) == ("COMPLETED", 0), summary["failure"]
    assert [r["position"]["epochs_done"] for r in summary["rollbacks"]] == [1, 1]
    events = run_events(tr.run_dir.path)
    failed = [e["attributes"]["error"] for e in events if e["event"] == "checkpoint.failed"]
    assert failed == [], failed
    assert tr.parts is not None and tr.parts.checkpointer.failures == 0
    assert level_changes(events)[0] == ("NOMINAL", "ELEVATED", "raise_elevated")
    assert ("NOTICE", "checkpoint_write_error") not in [
        (s["attributes"]["signal_level"], s["attributes"].get("cause")) for s in events
        if s["event"] == "emergency.signal"]
    written = [e["attributes"]["epoch"] for e in events if e["event"] == "checkpoint.written"]
    assert written == [1, 2, 2, 3, 4]
    assert verify_checkpoint(Path(summary["checkpoint"])).ok


# ----------------------------------------------------------------------------------- CONSERVATIVE (forced)


def _between(events: list[dict[str, Any]], start: int, end: int) -> Iterator[dict[str, Any]]:
    return (e for e in events if start < e["seq"] < end)


@pytest.mark.slow
def test_forced_conservative_suspends_every_lifecycle_mutation_until_the_policy_clears(tmp_path: Path) -> None:
    cfg = drill_config(config_mod.load(BASE_TOML).config,
                       ['controller.isolation="inline"', "emergency.slow_step_ms=600000.0",
                        "seeds.max_step_latency_ms=600000.0", "controller.risk.max_step_latency_ms=600000.0"],
                       synthetic=True)
    doc = run_drill(cfg, fault=None, level="conservative", at="2:1", run_dir=tmp_path / "run", synthetic=True)
    assert doc["matched"], doc["mismatches"]
    events = run_events(tmp_path / "run")
    up = next(e for e in events if e["event"] == "emergency.level" and e["attributes"]["to_level"] == "CONSERVATIVE")
    down = next(e for e in events if e["event"] == "emergency.level" and e["attributes"]["transition"]["trigger"]
                in ("clear", "downgrade") and e["seq"] > up["seq"])
    assert down["level"] == "CRITICAL" and down["attributes"]["transition"]["reason"]
    window = list(_between(events, up["seq"], down["seq"]))
    germinations = [e for e in window if (e["event"] == "command.accepted"
                                          and e["attributes"]["command"]["kind"] == "germinate")
                    or (e["event"] == "seed.transition"
                        and e["attributes"]["transition"]["dest"] == "GERMINATED")]
    assert germinations == []
    assert [e for e in window if e["event"] == "seed.transition"] == []  # seeds frozen in their stage
    assert [e for e in window if e["event"] == "controller_decision"] == []  # the controller was not asked
    paused_epochs = sorted({e["epoch"] for e in window if e["event"] == "epoch.completed"} | {down["epoch"]})
    suspended = [e["epoch"] for e in events if e["event"] == "controller.suspended"]
    assert suspended == paused_epochs and len(suspended) == 3  # epochs 2 (incident), 3, 4 (healthy x2)
    # the test can fail: this controller does germinate once it is allowed to
    after = [e for e in events if e["seq"] > down["seq"] and e["event"] == "command.accepted"
             and e["attributes"]["command"]["kind"] == "germinate"]
    assert after, "the controller never germinated after the downgrade: the window above proves nothing"


def test_simulate_emergency_rejects_an_unknown_level_or_fault_before_running(tmp_path: Path) -> None:
    # bad option values and options that exclude each other are usage errors (exit 2), found before anything runs
    for args in (["--level", "bogus"], ["--level", "nominal"], ["--fault", "no_such_fault"],
                 ["--fault", "nan_loss", "--level", "halt"], [], ["--fault", "nan_loss", "--at", "abc"],
                 ["--fault", "nan_loss", "--at", "0:1"]):
        run = tmp_path / "-".join(args or ["none"])
        r = esper("simulate-emergency", *args, "--run-dir", str(run), "--json")
        assert r.exit_code == int(ExitCode.USAGE), (args, out(r))
        assert json.loads(r.stdout)["exit_code"] == 2 and "Traceback" not in r.output
        assert not run.exists(), f"{args}: a refused drill must not create its run directory"
    r = esper("simulate-emergency", "--level", "bogus")
    assert "bogus" in out(r) and "conservative" in out(r)


@pytest.mark.slow
def test_a_drill_whose_outcome_does_not_match_exits_7(tmp_path: Path) -> None:
    # --set goes on top of the drill defaults: a 2-epoch run in which epoch 9 never comes
    r = esper("simulate-emergency", "--fault", "nan_loss", "--synthetic", "--at", "9:0",
              "--run-dir", str(tmp_path / "run"),
              "--json", *sets('data.task="synthetic"', "data.synthetic_samples=128", "trainer.epochs=2",
                              'controller.isolation="inline"'))
    assert r.exit_code == int(ExitCode.EXPECTATION), out(r)
    doc = json.loads(r.stdout)
    assert doc["matched"] is False
    assert any("never fired" in m for m in doc["mismatches"])
    assert any("expected a rollback" in m for m in doc["mismatches"])


# --------------------------------------------------------------------------- escalation durable before action


@pytest.mark.slow
def test_sigkill_right_after_an_escalation_still_finds_the_event_on_disk(tmp_path: Path) -> None:
    """The HALT escalation is followed by a long action (the emergency checkpoint, held by commit_delay_ms):
    kill the whole process group as soon as the event is readable, then the event is in events.jsonl and the
    action it announced never finished."""
    run = tmp_path / "run"
    log = tmp_path / "esper.log"
    proc = spawn(run, 'data.task="synthetic"', "data.synthetic_samples=128", "trainer.epochs=3", "seeds.enabled=false",
                 "emergency.max_checkpoint_failures=1", "checkpoint.commit_delay_ms=4000",
                 "emergency.slow_step_ms=600000.0", log=log, flags=["--fault", "checkpoint_write_error@1"])
    try:
        wait_for(lambda: reported(run, "emergency.level", to_level="HALT"), proc, log, "the HALT event", 120)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    events = run_events(run)
    [halt] = [e for e in events if e["event"] == "emergency.level"]
    assert (halt["level"], halt["attributes"]["to_level"]) == ("CRITICAL", "HALT")
    # the action it announced (the emergency checkpoint) had not finished when the process died
    assert not (run / "checkpoints" / "epoch-0000-emergency").exists()
    assert not any(e["event"] == "checkpoint.written" for e in events)
    assert "HALTED" not in [e["attributes"].get("transition", {}).get("dest") for e in events]
    wait_until(lambda: not session_pids(proc.pid), "the killed run's processes to go", 10)
