"""Tamiyo: heuristic policy, risk stage, validator, controller state and the decision pipeline (T-6, T-11)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from esper.core.config import ControllerConfig, RiskConfig, SeedsConfig
from esper.core.tamiyo import (
    Command,
    ControllerState,
    ControllerStateError,
    Decision,
    Observation,
    ObservationError,
    Outcome,
    Proposal,
    RiskHistory,
    RiskStage,
    SlotView,
    Tamiyo,
    TamiyoError,
    ValidationContext,
    validate,
)
from esper.core.tamiyo.state import EpochMetrics, EpochRecord
from esper.core.tamiyo.worker import factory_args, make_worker

RUN = "run-test"
T0 = "2024-05-01T12:00:00+00:00"
PARAMS = {"residual_mlp": 300, "lowrank": 100, "bottleneck": 200}
ALL_BLUEPRINTS = ("residual_mlp", "lowrank", "gated", "bottleneck")  # every slot accepts these unless a test says


def seeds_cfg(**kw: object) -> SeedsConfig:
    """These tests reason about one live seed at a time: pin max_active instead of leaning on the default."""
    return SeedsConfig(**{"max_active": 1, **kw})  # type: ignore[arg-type]


def clock() -> str:
    return T0


def slot(name: str, stage: str = "DORMANT", blueprint: str | None = None, epochs: int = 0,
         gain: float | None = None, params: dict[str, int] | None = None, kind: str = "features",
         shape: tuple[int, ...] = (6,), compatible: tuple[str, ...] | None = None) -> dict[str, Any]:
    params = dict(PARAMS if params is None else params)
    return {"name": name, "kind": kind, "shape": list(shape),
            "compatible": list(ALL_BLUEPRINTS if compatible is None else compatible), "stage": stage,
            "blueprint": blueprint, "epochs_in_stage": epochs,
            "alpha": 1.0 if stage in ("SHADOWING", "PROBATIONARY", "FOSSILIZED") else 0.0,
            "seed_loss_improvement": None, "counterfactual_gain": gain, "candidate_params": params}


def obs(epoch: int, val_loss: float, *, slots: list[dict[str, Any]] | None = None, acc: float = 0.5,
        latency: float = 10.0, rollbacks: int = 0, run_id: str = RUN) -> dict[str, Any]:
    return {"run_id": run_id, "epoch": epoch, "train_loss": val_loss * 0.9, "val_loss": val_loss,
            "val_metrics": {"val_accuracy": acc}, "primary_metric": "val_accuracy", "direction": "max",
            "step_latency_ms": latency, "rollbacks_total": rollbacks, "total_params": 1000,
            "slots": slots if slots is not None else [slot("s1"), slot("s2")]}


def ctrl(**kw: Any) -> ControllerConfig:
    risk = kw.pop("risk", {})
    return ControllerConfig(risk=RiskConfig(**risk), **kw)


def tamiyo(controller: ControllerConfig | None = None, seeds: SeedsConfig | None = None, **kw: Any) -> Tamiyo:
    return Tamiyo(controller or ctrl(), seeds or seeds_cfg(), RUN, clock=clock, **kw)


class FixedPolicy:
    """Proposes the same things every epoch (to drive the risk stage and validator through the controller)."""

    def __init__(self, *proposals: Proposal) -> None:
        self.proposals = list(proposals)

    def decide(self, obs: Observation, state: ControllerState) -> list[Proposal]:
        return list(self.proposals)


def feed(t: Tamiyo, losses: list[float], start: int = 0) -> list[Decision]:
    """Decide on each epoch; accepted commands are reported as not applied (the slots stay DORMANT)."""
    out = []
    for i, loss in enumerate(losses):
        d = t.decide(obs(start + i, loss))
        for c in d.accepted:
            t.aborted(c.command_id, "test: not applied")
        out.append(d)
    return out


# --- policy: germination on a plateau ------------------------------------------------------------------


def test_germinates_on_plateau_into_first_free_slot_with_first_blueprint() -> None:
    t = tamiyo()
    decisions = feed(t, [1.0, 0.8, 0.6, 0.6, 0.6])
    assert [d.proposed for d in decisions[:4]] == [()] * 4  # ep3: 0.8 -> 0.6 over 2 epochs is still progress
    (cmd,) = decisions[4].accepted
    assert (cmd.kind, cmd.slot, cmd.blueprint, cmd.reason_code) == ("germinate", "s1", "residual_mlp", "plateau")
    assert "plateau" in cmd.reason and "0.6" in cmd.reason
    assert cmd.run_id == RUN and cmd.epoch == 4


@pytest.mark.parametrize(("warmup", "first"), [(0, 2), (1, 2), (4, 4), (6, 6)])
def test_no_germination_before_warmup(warmup: int, first: int) -> None:
    t = tamiyo(ctrl(warmup_epochs=warmup))
    decisions = feed(t, [1.0] * 8)
    germ_epochs = [d.epoch for d in decisions if d.accepted]
    assert germ_epochs and germ_epochs[0] == first


def test_no_germination_without_plateau() -> None:
    t = tamiyo()
    decisions = feed(t, [1.0 * 0.9**i for i in range(10)])  # 19% better every 2 epochs
    assert all(d.proposed == () for d in decisions)


def test_plateau_threshold_is_relative_improvement_over_window() -> None:
    # 1.0 -> 0.985 over 2 epochs is 1.5% < 2%: a plateau; with min_delta 1% it is progress.
    assert feed(tamiyo(), [1.0, 0.99, 0.985])[2].accepted
    assert not feed(tamiyo(ctrl(plateau_min_delta=0.01)), [1.0, 0.99, 0.985])[2].proposed


def test_no_candidate_gives_no_command() -> None:
    t = tamiyo()
    busy = [slot("s1", "TRAINING", "lowrank", epochs=1), slot("s2")]
    decisions = [t.decide(obs(i, 1.0, slots=busy)) for i in range(5)]  # plateau, but max_active=1 is in use
    assert all(d.proposed == () and d.accepted == () and d.rejected == () for d in decisions)
    no_free = [slot("s1", "FOSSILIZED", "lowrank"), slot("s2", "EMBARGOED")]
    t2 = tamiyo()
    assert all(t2.decide(obs(i, 1.0, slots=no_free)).proposed == () for i in range(5))


def test_blueprint_round_robin_and_slot_rotation() -> None:
    t = tamiyo()
    feed(t, [1.0, 1.0])
    first = t.decide(obs(2, 1.0)).accepted[0]
    t.applied(first)
    t.observe_outcomes(obs(2, 1.0))
    # the seed vanished and both slots are DORMANT: the next germination rotates slot and blueprint
    second = t.decide(obs(3, 1.0)).accepted[0]
    assert (first.slot, first.blueprint) == ("s1", "residual_mlp")
    assert (second.slot, second.blueprint) == ("s2", "lowrank")


def test_regressed_blueprint_is_not_germinated_again() -> None:
    t = tamiyo(seeds=seeds_cfg(blueprints=["residual_mlp"]))
    feed(t, [1.0, 1.0])
    germ = t.decide(obs(2, 1.0)).accepted[0]
    t.applied(germ)
    prob = [slot("s1", "PROBATIONARY", "residual_mlp", epochs=1, gain=-0.05), slot("s2")]
    cull = t.decide(obs(3, 1.0, slots=prob)).accepted[0]
    assert (cull.kind, cull.reason_code) == ("cull", "regressed") and "regressed" in cull.reason
    t.applied(cull)
    assert t.state_dict()["regressed_blueprints"] == ["residual_mlp"]
    # a plateau and a free slot, but the only blueprint regressed: no candidate, no command
    assert t.decide(obs(4, 1.0, slots=[slot("s1", "CULLED", "residual_mlp"), slot("s2")])).proposed == ()
    # a stalled (not regressed) cull does not ban the blueprint
    t2 = tamiyo(ctrl(stall_epochs=1), seeds_cfg(blueprints=["residual_mlp"]))
    feed(t2, [1.0, 1.0])
    t2.applied(t2.decide(obs(2, 1.0)).accepted[0])
    stalled = t2.decide(obs(3, 1.0, slots=[slot("s1", "TRAINING", "residual_mlp", epochs=1), slot("s2")]))
    t2.applied(stalled.accepted[0])
    assert t2.decide(obs(4, 1.0, slots=[slot("s1", "CULLED", "residual_mlp"), slot("s2")])).accepted[0].slot == "s2"


def test_fossilize_after_probation_when_gain_holds() -> None:
    t = tamiyo(seeds=seeds_cfg(probation_epochs=2))
    early = [slot("s1", "PROBATIONARY", "lowrank", epochs=1, gain=0.1), slot("s2", "TRAINING", "lowrank")]
    assert t.decide(obs(0, 1.0, slots=early)).proposed == ()
    ready = [slot("s1", "PROBATIONARY", "lowrank", epochs=2, gain=0.1), slot("s2", "TRAINING", "lowrank")]
    (cmd,) = t.decide(obs(1, 1.0, slots=ready)).accepted
    assert (cmd.kind, cmd.slot, cmd.blueprint, cmd.reason_code) == ("fossilize", "s1", "lowrank", "proven")


def test_cull_stalled_seed_with_reason() -> None:
    t = tamiyo(ctrl(stall_epochs=3))
    assert t.decide(obs(0, 1.0, slots=[slot("s1", "BLENDING", "lowrank", epochs=2), slot("s2")])).proposed == ()
    (cmd,) = t.decide(obs(1, 1.0, slots=[slot("s1", "BLENDING", "lowrank", epochs=3), slot("s2")])).accepted
    assert (cmd.kind, cmd.reason_code) == ("cull", "stalled")
    assert "3 epochs in BLENDING" in cmd.reason


# --- policy: only blueprints that fit the slot's kind (issue 13) ----------------------------------------

MIXED = SeedsConfig(blueprints=["residual_mlp", "conv_block", "lowrank"], max_active=2)


def mixed_slots(s1: str = "DORMANT") -> list[dict[str, Any]]:
    """s1 is a conv slot (conv_block only), s2 a features slot (the two MLP-style blueprints)."""
    return [slot("s1", s1, "conv_block" if s1 != "DORMANT" else None, kind="channels1d", shape=(6, 19),
                 compatible=("conv_block",), params={"conv_block": 1470}),
            slot("s2", compatible=("residual_mlp", "lowrank"), params={"residual_mlp": 162, "lowrank": 30})]


def test_the_policy_proposes_only_blueprints_compatible_with_the_slot() -> None:
    t = tamiyo(seeds=MIXED)
    for epoch in (0, 1):  # the plateau window fills
        assert t.decide(obs(epoch, 1.0, slots=mixed_slots())).proposed == ()
    (first,) = t.decide(obs(2, 1.0, slots=mixed_slots())).accepted
    assert (first.slot, first.blueprint) == ("s1", "conv_block")  # residual_mlp comes first, but not for s1
    t.applied(first)
    t.observe_outcomes(obs(2, 1.0, slots=mixed_slots()))
    (second,) = t.decide(obs(3, 1.0, slots=mixed_slots("TRAINING"))).accepted
    assert (second.slot, second.blueprint) == ("s2", "residual_mlp")


def test_a_free_slot_without_a_usable_compatible_blueprint_is_skipped() -> None:
    t = tamiyo(seeds=MIXED)
    only_conv = [slot("s1", compatible=()), slot("s2", kind="channels2d", shape=(4, 8, 8), compatible=("conv_block",),
                                                 params={"conv_block": 2622})]
    for epoch in (0, 1):
        t.decide(obs(epoch, 1.0, slots=only_conv))
    (cmd,) = t.decide(obs(2, 1.0, slots=only_conv)).accepted
    assert (cmd.slot, cmd.blueprint) == ("s2", "conv_block")
    nothing = [slot("s1", compatible=()), slot("s2", compatible=())]
    t2 = tamiyo(seeds=MIXED)
    assert all(t2.decide(obs(i, 1.0, slots=nothing)).proposed == () for i in range(4))  # no candidate, no command


def test_an_incompatible_command_is_rejected_by_the_validator_with_the_slots_layout() -> None:
    t = tamiyo(seeds=MIXED, policy=FixedPolicy(Proposal("germinate", "s1", "lowrank", "ignores kinds", "test")))
    decision = t.decide(obs(0, 1.0, slots=mixed_slots()))
    (rej,) = decision.rejected
    assert rej.stage == "validator" and decision.accepted == ()
    assert rej.reason == ("blueprint 'lowrank' does not accept slot 's1' (channels1d [N, 6, 19]); compatible there: "
                          "conv_block")


# --- observations ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mutate", [
    lambda d: d.pop("val_loss"),
    lambda d: d.update(val_loss=float("nan")),
    lambda d: d.update(train_loss=float("inf")),
    lambda d: d.update(val_metrics={"val_accuracy": None}),
    lambda d: d.update(val_metrics={"accuracy": 0.5}),  # metrics are named val_<name>
    lambda d: d.update(primary_metric="val_f1"),  # the primary metric is one the observation carries
    lambda d: d.update(direction="up"),
    lambda d: d.pop("primary_metric"),
    lambda d: d.update(step_latency_ms="12"),
    lambda d: d.update(rollbacks_total=True),
    lambda d: d["slots"][0].update(stage="SPROUTING"),
    lambda d: d["slots"][0].update(stage="TRAINING", blueprint=None),
    lambda d: d["slots"][0].pop("candidate_params"),
    lambda d: d["slots"][0].pop("kind"),
    lambda d: d["slots"][0].update(kind="voxels"),
    lambda d: d["slots"][0].update(kind="channels2d"),  # its shape [6] is not [C, H, W]
    lambda d: d["slots"][0].update(shape=[0]),
    lambda d: d["slots"][0].pop("compatible"),
    lambda d: d["slots"][1].update(alpha=float("nan")),
])
def test_broken_observation_is_an_error(mutate: Any) -> None:
    data = obs(0, 1.0)
    mutate(data)
    with pytest.raises(ObservationError):
        Observation.from_dict(data)
    t = tamiyo()
    with pytest.raises(ObservationError):
        t.decide(data)
    assert t.state_dict() == tamiyo().state_dict()  # a rejected observation changes nothing


def test_observation_slots_must_match_config_and_epochs_advance() -> None:
    t = tamiyo()
    with pytest.raises(ObservationError, match="missing"):
        t.decide(obs(0, 1.0, slots=[slot("s1")]))
    with pytest.raises(ObservationError, match="unknown"):
        t.decide(obs(0, 1.0, slots=[slot("s1"), slot("s2"), slot("s3")]))
    with pytest.raises(ObservationError, match="run"):
        t.decide(obs(0, 1.0, run_id="other"))
    t.decide(obs(3, 1.0))
    with pytest.raises(ObservationError, match="not after"):
        t.decide(obs(3, 1.0))


def test_probationary_without_counterfactual_is_an_error() -> None:
    t = tamiyo()
    with pytest.raises(ObservationError, match="counterfactual_gain"):
        t.decide(obs(0, 1.0, slots=[slot("s1", "PROBATIONARY", "lowrank", epochs=1), slot("s2")]))


# --- validator ------------------------------------------------------------------------------------------


def command(kind: str = "germinate", slot_name: str = "s1", blueprint: str | None = "lowrank", epoch: int = 3,
            seq: int = 0, run_id: str = RUN) -> Command:
    return Command(command_id=f"cmd-{epoch:04d}-{seq:03d}", run_id=run_id, epoch=epoch, kind=kind,  # type: ignore[arg-type]
                   slot=slot_name, blueprint=blueprint, reason="test", reason_code="test", issued_at=T0)


def ctx(epoch: int = 3, issued: frozenset[str] = frozenset()) -> ValidationContext:
    views = [SlotView.model_validate(slot(name), strict=False) for name in ("s1", "s2")]
    return ValidationContext.build(seeds_cfg(), RUN, epoch, issued, views)


@pytest.mark.parametrize(("cmd", "stages", "context", "needle"), [
    (command("fossilize"), {"s1": "DORMANT"}, ctx(), "fossilize is not allowed for slot 's1' in stage DORMANT"),
    (command("cull"), {"s1": "FOSSILIZED"}, ctx(), "in stage FOSSILIZED"),
    (command("germinate"), {"s1": "TRAINING"}, ctx(), "in stage TRAINING"),
    (command(blueprint="made_up"), {"s1": "DORMANT"}, ctx(), "not in seeds.blueprints"),
    (command(slot_name="s9"), {"s1": "DORMANT", "s9": "DORMANT"}, ctx(), "unknown slot 's9'"),
    (command(), {"s2": "DORMANT"}, ctx(), "no observed stage"),
    (command(run_id="other"), {"s1": "DORMANT"}, ctx(), "run id"),
    (command(epoch=2), {"s1": "DORMANT"}, ctx(), "not the current epoch 3"),
    (command(), {"s1": "DORMANT"}, ctx(issued=frozenset({"cmd-0003-000"})), "already issued"),
])
def test_validator_rejects_with_reason(cmd: Command, stages: dict[str, str], context: ValidationContext,
                                       needle: str) -> None:
    result = validate(cmd, stages, context)
    assert not result.ok
    assert needle in result.reason


def test_validator_accepts_legal_commands() -> None:
    assert validate(command(), {"s1": "DORMANT"}, ctx()).ok
    assert validate(command("fossilize"), {"s1": "PROBATIONARY"}, ctx()).ok
    assert validate(command("cull"), {"s1": "BLENDING"}, ctx()).ok


def test_illegal_command_rejected_by_controller_and_changes_nothing() -> None:
    t = tamiyo(policy=FixedPolicy(Proposal("fossilize", "s1", "lowrank", "bogus", "test")))
    decision = t.decide(obs(0, 1.0))
    assert decision.accepted == ()
    (rej,) = decision.rejected
    assert rej.stage == "validator" and "DORMANT" in rej.reason and rej.command == decision.proposed[0]
    with pytest.raises(TamiyoError, match="not an accepted command"):
        t.applied(rej.command)
    assert t.state_dict()["awaiting"] == [] and t.state_dict()["windows"] == []


def test_second_command_on_same_slot_sees_the_first() -> None:
    t = tamiyo(policy=FixedPolicy(Proposal("fossilize", "s1", "lowrank", "a", "a"),
                                  Proposal("cull", "s1", "lowrank", "b", "b")))
    d = t.decide(obs(0, 1.0, slots=[slot("s1", "PROBATIONARY", "lowrank", epochs=1, gain=0.1), slot("s2")]))
    assert [c.kind for c in d.accepted] == ["fossilize"]
    assert "FOSSILIZED" in d.rejected[0].reason


def test_command_rejects_fabricated_or_empty_ids() -> None:
    base = command().to_dict()
    for bad in ({"command_id": ""}, {"command_id": "abc"}, {"command_id": "cmd-0002-000"}, {"reason": ""},
                {"issued_at": "2024-05-01T12:00:00"}, {"kind": "germinate", "blueprint": None}):
        with pytest.raises(TamiyoError):
            Command.from_dict({**base, **bad})


# --- risk -----------------------------------------------------------------------------------------------


def history(*losses: float, rollbacks: list[int] | None = None, start: int = 0) -> RiskHistory:
    totals = rollbacks or [0] * len(losses)
    return RiskHistory(tuple(
        EpochRecord(metrics=EpochMetrics(epoch=start + i, train_loss=x, val_loss=x, val_accuracy=0.5),
                    rollbacks_total=r) for i, (x, r) in enumerate(zip(losses, totals, strict=True))))


RISK = RiskStage(ctrl(), seeds_cfg())


@pytest.mark.parametrize(("observation", "hist", "limit", "deferred"), [
    (obs(3, 1.0), history(1.0, 3.0, 1.0, start=1), "loss_volatility", True),
    (obs(3, 1.0, latency=1500.0), history(1.0, 1.0, 1.0, start=1), "step_latency", True),
    (obs(3, 1.0, slots=[slot("s1"), slot("s2", "TRAINING", "lowrank")]), history(1.0, start=3), "seeds_active",
     False),
    (obs(3, 1.0, slots=[slot("s1", params={"lowrank": 20001}), slot("s2")]), history(1.0, start=3),
     "param_budget", False),
    (obs(3, 1.0, slots=[slot("s1", params={}), slot("s2")]), history(1.0, start=3), "param_budget", False),
    (obs(3, 1.0, rollbacks=1), history(1.0, 1.0, 1.0, start=1), "recent_rollbacks", False),
])
def test_each_risk_limit_refuses_with_its_name(observation: dict[str, Any], hist: RiskHistory, limit: str,
                                               deferred: bool) -> None:
    o = Observation.from_dict(observation)
    cmd = command()
    verdict = RISK.assess(cmd, o, hist)
    assert (verdict.accepted, verdict.deferred, verdict.limit) == (False, deferred, limit)
    assert verdict.reason
    assert RISK.assess(command("cull"), o, hist).accepted  # a cull is never held back


def test_risk_accepts_within_limits_and_old_rollbacks_do_not_count() -> None:
    o = Observation.from_dict(obs(5, 1.0, rollbacks=1))
    # the rollback happened by epoch 1; the window of 3 epochs looks back to epoch 2
    hist = history(1.0, 1.0, 1.0, 1.0, 1.0, rollbacks=[0, 1, 1, 1, 1], start=1)
    assert RISK.assess(command(epoch=5), o, hist).accepted
    recent = history(1.0, 1.0, 1.0, 1.0, 1.0, rollbacks=[0, 0, 1, 1, 1], start=1)
    assert RISK.assess(command(epoch=5), o, recent).limit == "recent_rollbacks"


@pytest.mark.parametrize(("risk", "observation", "limit", "deferred"), [
    ({"max_step_latency_ms": 50.0}, lambda e: obs(e, 1.0, latency=60.0), "step_latency", True),
    ({"max_recent_rollbacks": 0}, lambda e: obs(e, 1.0, rollbacks=1), "recent_rollbacks", False),
])
def test_risk_refusal_through_controller_is_never_rewritten(risk: dict[str, Any], observation: Any, limit: str,
                                                            deferred: bool) -> None:
    t = tamiyo(ctrl(risk=risk))
    t.decide(obs(0, 1.0))
    t.decide(obs(1, 1.0))
    d = t.decide(observation(2))
    (proposed,) = d.proposed
    assert proposed.kind == "germinate"
    assert d.accepted == ()
    (rej,) = d.rejected
    assert (rej.stage, rej.limit, rej.deferred) == ("risk", limit, deferred)
    assert rej.command == proposed  # the same command, not a pause or another kind
    assert t.state_dict()["awaiting"] == []


def test_two_germinations_in_one_decision_count_against_max_active() -> None:
    t = tamiyo(policy=FixedPolicy(Proposal("germinate", "s1", "lowrank", "a", "a"),
                                  Proposal("germinate", "s2", "lowrank", "b", "b")))
    d = t.decide(obs(0, 1.0))
    assert [c.slot for c in d.accepted] == ["s1"]
    assert d.rejected[0].limit == "seeds_active"


# --- ids, determinism, state persistence ------------------------------------------------------------------


def scenario(t: Tamiyo, epochs: range) -> list[dict[str, Any]]:
    """A run where a seed germinates, walks to PROBATIONARY and is fossilized; returns every decision."""
    out = []
    seed_stage: dict[str, Any] = {}
    for e in epochs:
        loss = max(0.5, 1.0 - 0.2 * e) if e < 3 else 0.5
        slots = [slot("s1", **seed_stage) if seed_stage else slot("s1"), slot("s2")]
        d = t.decide(obs(e, loss, slots=slots))
        for c in d.accepted:
            t.applied(c)
        t.observe_outcomes(obs(e, loss, slots=slots))
        out.append(d.to_dict())
        for c in d.accepted:
            if c.kind == "germinate":
                seed_stage = {"stage": "TRAINING", "blueprint": c.blueprint, "epochs": 0}
            if c.kind == "fossilize":
                seed_stage = {"stage": "FOSSILIZED", "blueprint": c.blueprint}
        if seed_stage and seed_stage["stage"] == "TRAINING":
            seed_stage = {"stage": "PROBATIONARY", "blueprint": seed_stage["blueprint"], "epochs": 1, "gain": 0.1}
    return out


def test_ids_are_deterministic_unique_and_well_formed() -> None:
    a = scenario(tamiyo(), range(12))
    b = scenario(tamiyo(), range(12))
    assert a == b
    ids = [c["command_id"] for d in a for c in d["proposed"]]
    assert len(ids) >= 3 and len(set(ids)) == len(ids)
    assert all(i.startswith(f"cmd-{d['epoch']:04d}-") for d in a for i in (c["command_id"] for c in d["proposed"]))
    assert [int(i.rsplit("-", 1)[1]) for i in ids] == list(range(len(ids)))


def test_state_round_trip_gives_identical_later_decisions() -> None:
    straight = tamiyo()
    first = scenario(straight, range(4))
    saved = json.loads(json.dumps(straight.state_dict()))
    resumed = tamiyo()
    resumed.load_state_dict(saved)
    assert resumed.state_dict() == saved
    assert ControllerState.from_dict(saved).to_dict() == saved
    rest_straight = scenario(straight, range(4, 12))
    rest_resumed = scenario(resumed, range(4, 12))
    assert rest_resumed == rest_straight
    # the state matters: a controller without it decides differently over the same epochs
    assert scenario(tamiyo(), range(4, 12)) != rest_straight
    assert any(d["accepted"] for d in first + rest_straight)


@pytest.mark.parametrize("corrupt", [
    lambda s: s.update(schema_version="tamiyo-state/0"),
    lambda s: s.update(next_seq=-1),
    lambda s: s.update(next_seq="3"),
    lambda s: s.update(run_id="another-run"),
    lambda s: s.pop("history") and s.update(histroy=[]),
    lambda s: s["history"][0]["metrics"].update(val_loss=float("nan")),
])
def test_state_restore_failure_is_typed_and_keeps_current_state(corrupt: Any) -> None:
    t = tamiyo()
    feed(t, [1.0, 0.9])
    data = t.state_dict()
    before = json.dumps(data)
    corrupt(data)
    with pytest.raises(ControllerStateError):
        t.load_state_dict(data)
    assert json.dumps(t.state_dict()) == before
    with pytest.raises(ControllerStateError):
        t.load_state_dict([1, 2])


def test_unacknowledged_accepted_command_is_an_error_next_epoch() -> None:
    t = tamiyo()
    d = [t.decide(obs(e, 1.0)) for e in range(3)]
    assert d[2].accepted
    with pytest.raises(TamiyoError, match="never reported"):
        t.decide(obs(3, 1.0))
    t.aborted(d[2].accepted[0].command_id, "G0 refused the blueprint")
    t.decide(obs(3, 1.0))  # the command that failed to apply needs no report
    assert t.observe_outcomes(obs(3, 1.0)) == []


def test_rewind_keeps_ids_unique_and_aborts_later_commands() -> None:
    t = tamiyo()
    feed(t, [1.0, 1.0])
    germ = t.decide(obs(2, 1.0)).accepted[0]
    t.applied(germ)
    t.rewind(1, "full rollback")
    d2 = t.decide(obs(2, 1.0))  # epoch 2 again after the rollback
    (report,) = t.observe_outcomes(obs(2, 1.0))
    assert report.outcome is Outcome.ABORTED and "rolled back" in report.outcome_reason
    assert d2.accepted and d2.accepted[0].command_id != germ.command_id


# --- worker protocol ------------------------------------------------------------------------------------


def test_worker_payload_and_adopt_match_inline_decisions() -> None:
    inline, parent = tamiyo(), tamiyo()
    worker = make_worker(**json.loads(json.dumps(factory_args(ctrl(), seeds_cfg(), RUN))))
    for e, loss in enumerate([1.0, 1.0, 1.0]):
        expected = inline.decide(obs(e, loss))
        reply = json.loads(json.dumps(worker.decide(parent.payload(obs(e, loss)))))
        got = parent.adopt(reply)
        assert [c.model_dump(exclude={"issued_at"}) for c in got.accepted] == \
            [c.model_dump(exclude={"issued_at"}) for c in expected.accepted]
    assert got.accepted
    with pytest.raises(ObservationError):
        parent.payload(obs(3, float("nan")))
    with pytest.raises(TamiyoError):
        parent.adopt({"decision": {}})


def test_package_does_not_import_torch() -> None:
    code = "import sys, esper.core.tamiyo, esper.core.tamiyo.worker; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
