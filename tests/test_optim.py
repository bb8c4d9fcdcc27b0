"""Optimizer build/rebuild with state carry-over and the LR schedule (SPEC T-8, Tolaria #8-#16)."""

from __future__ import annotations

import gc
import json
import math
import weakref
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esper.core.config import TrainerConfig
from esper.core.errors import EsperError, ExitCode
from esper.core.model.optim import (
    LRSchedule,
    OptimizerError,
    ParamGroupSpec,
    build_optimizer,
    rebuild_optimizer,
)


def _param(*shape: int, seed: int = 0) -> torch.nn.Parameter:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(*shape, generator=g))


def _step(opt: torch.optim.Optimizer, n: int = 2) -> None:
    """A few real optimizer steps so every parameter has state."""
    for _ in range(n):
        opt.zero_grad()
        loss = sum((p**2).sum() for g in opt.param_groups for p in g["params"])
        loss.backward()
        opt.step()


def _state_of(opt: torch.optim.Optimizer, p: torch.Tensor) -> dict[str, Any]:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state.get(p, {}).items()}


# --------------------------------------------------------------------------------------------- build


def test_build_names_groups_and_applies_overrides() -> None:
    cfg = TrainerConfig(lr=0.1, weight_decay=0.01, momentum=0.8)
    h, s = _param(3), _param(2, seed=1)
    opt = build_optimizer(
        cfg, [ParamGroupSpec("host", [h]), ParamGroupSpec("seed:s1", [s], lr=0.5, weight_decay=0.0)]
    )
    assert isinstance(opt, torch.optim.SGD)
    host, seed = opt.param_groups
    assert (host["name"], host["base_lr"], host["lr"], host["weight_decay"], host["momentum"]) == (
        "host", 0.1, 0.1, 0.01, 0.8)
    assert (seed["name"], seed["base_lr"], seed["lr"], seed["weight_decay"]) == ("seed:s1", 0.5, 0.5, 0.0)


def test_build_adamw() -> None:
    opt = build_optimizer(TrainerConfig(optimizer="adamw", lr=1e-3, min_lr=0.0, weight_decay=0.05),
                          [ParamGroupSpec("host", [_param(2)])])
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["weight_decay"] == 0.05


def test_param_in_two_groups_is_an_error() -> None:
    p = _param(2)
    with pytest.raises(OptimizerError, match="'host' and 'seed:s1'"):
        build_optimizer(TrainerConfig(), [ParamGroupSpec("host", [p]), ParamGroupSpec("seed:s1", [p])])
    with pytest.raises(OptimizerError, match="twice"):
        build_optimizer(TrainerConfig(), [ParamGroupSpec("host", [p, p])])


@pytest.mark.parametrize(
    ("groups", "match"),
    [
        ([], "at least one"),
        ([ParamGroupSpec("host", [])], "no parameters"),
        ([ParamGroupSpec("", [_param(1)])], "non-empty"),
        ([ParamGroupSpec("a", [_param(1)]), ParamGroupSpec("a", [_param(1)])], "duplicate"),
        ([ParamGroupSpec("a", [_param(1)], lr=0.0)], "invalid lr"),
        ([ParamGroupSpec("a", [_param(1)], weight_decay=float("nan"))], "invalid weight_decay"),
        ([ParamGroupSpec("a", [_param(1) * 2])], "not a leaf"),  # type: ignore[list-item]
    ],
)
def test_build_rejects_bad_groups(groups: list[ParamGroupSpec], match: str) -> None:
    with pytest.raises(OptimizerError, match=match):
        build_optimizer(TrainerConfig(), groups)


def test_optimizer_error_is_typed() -> None:
    assert issubclass(OptimizerError, EsperError)
    assert OptimizerError.exit_code is ExitCode.INTERNAL


# ------------------------------------------------------------------------------------------- rebuild


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_rebuild_keeps_group_settings_and_state(kind: str) -> None:
    cfg = TrainerConfig(optimizer=kind, lr=0.1, weight_decay=0.0)
    h1, h2, s1, s2 = _param(4), _param(2, 3, seed=1), _param(3, seed=2), _param(5, seed=3)
    opt = build_optimizer(cfg, [
        ParamGroupSpec("host", [h1, h2], lr=0.05, weight_decay=0.01),
        ParamGroupSpec("seed:s1", [s1], lr=0.3, weight_decay=0.2),
        ParamGroupSpec("seed:gone", [s2]),
    ])
    _step(opt, 3)
    # Settings changed after build (e.g. by the schedule or an operator) must survive too.
    opt.param_groups[1]["lr"] = 0.123
    before = {id(p): _state_of(opt, p) for p in (h1, h2, s1)}
    old_groups = {g["name"]: {k: v for k, v in g.items() if k != "params"} for g in opt.param_groups}

    n1 = _param(6, seed=4)
    new, report = rebuild_optimizer(opt, cfg, [
        ParamGroupSpec("host", [h1, h2], lr=9.0),  # override ignored: the group exists
        ParamGroupSpec("seed:s1", [s1]),
        ParamGroupSpec("seed:new", [n1], lr=0.7),
    ])
    assert new is not opt and type(new) is type(opt)
    groups = {g["name"]: g for g in new.param_groups}
    assert list(groups) == ["host", "seed:s1", "seed:new"]
    for name in ("host", "seed:s1"):
        assert {k: v for k, v in groups[name].items() if k != "params"} == old_groups[name]
    assert groups["seed:s1"]["lr"] == 0.123 and groups["seed:s1"]["weight_decay"] == 0.2
    assert groups["host"]["base_lr"] == 0.05 and groups["host"]["weight_decay"] == 0.01
    assert groups["seed:new"]["base_lr"] == 0.7 and groups["seed:new"]["weight_decay"] == 0.0
    for p in (h1, h2, s1):
        got = new.state[p]
        assert set(got) == set(before[id(p)]) and got
        for key, value in before[id(p)].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(got[key], value), key
                assert got[key].data_ptr() != opt.state[p][key].data_ptr(), "state must be copied, not shared"
            else:
                assert got[key] == value
    assert n1 not in new.state and s2 not in new.state
    assert report.to_dict() == {
        "added_groups": ["seed:new"], "removed_groups": ["seed:gone"], "kept_groups": ["host", "seed:s1"],
        "carried_states": 3, "dropped_states": 1, "fresh_params": 1, "moved_params": 0,
    }
    json.dumps(report.to_dict())


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_rebuilt_optimizer_steps_like_the_old_one(kind: str) -> None:
    """Carried state is the real state: one more step matches the never-rebuilt twin exactly."""
    cfg = TrainerConfig(optimizer=kind, lr=0.1)
    a, b = _param(4), _param(4)
    twin_a, twin_b = _param(4), _param(4)
    opt = build_optimizer(cfg, [ParamGroupSpec("host", [a]), ParamGroupSpec("seed:s1", [b], lr=0.2)])
    twin = build_optimizer(
        cfg, [ParamGroupSpec("host", [twin_a]), ParamGroupSpec("seed:s1", [twin_b], lr=0.2)]
    )
    _step(opt, 3)
    _step(twin, 3)
    new, _ = rebuild_optimizer(opt, cfg, [ParamGroupSpec("host", [a]), ParamGroupSpec("seed:s1", [b])])
    _step(new, 2)
    _step(twin, 2)
    assert torch.equal(a, twin_a) and torch.equal(b, twin_b)


def test_param_moving_group_keeps_state() -> None:
    cfg = TrainerConfig(optimizer="adamw", lr=0.01)
    h, s = _param(3), _param(3, seed=1)
    opt = build_optimizer(cfg, [ParamGroupSpec("host", [h]), ParamGroupSpec("seed:s1", [s])])
    _step(opt)
    before = _state_of(opt, s)
    new, report = rebuild_optimizer(opt, cfg, [ParamGroupSpec("host", [h, s])])  # seed fossilised into host
    assert torch.equal(new.state[s]["exp_avg"], before["exp_avg"])
    assert torch.equal(new.state[s]["exp_avg_sq"], before["exp_avg_sq"])
    assert float(new.state[s]["step"]) == float(before["step"]) == 2.0
    assert report.moved_params == 1 and report.carried_states == 2 and report.removed_groups == ("seed:s1",)


def test_state_carry_failure_is_an_error_and_leaves_old_intact() -> None:
    cfg = TrainerConfig(lr=0.1)
    h, s = _param(2, 2), _param(3, seed=1)
    opt = build_optimizer(cfg, [ParamGroupSpec("host", [h]), ParamGroupSpec("seed:s1", [s])])
    _step(opt)
    bad = torch.zeros(3)
    opt.state[h]["momentum_buffer"] = bad  # shape (3,) for a (2, 2) parameter
    groups_before = [dict(g) for g in opt.param_groups]
    with pytest.raises(OptimizerError, match=r"momentum_buffer.*'host'.*\(3,\).*\(2, 2\)"):
        rebuild_optimizer(opt, cfg, [ParamGroupSpec("host", [h]), ParamGroupSpec("seed:s1", [s])])
    assert opt.state[h]["momentum_buffer"] is bad
    assert [dict(g) for g in opt.param_groups] == groups_before


def test_state_carry_rejects_bad_step_counter_and_dtype() -> None:
    cfg = TrainerConfig(optimizer="adamw", lr=0.01)
    h = _param(2)
    opt = build_optimizer(cfg, [ParamGroupSpec("host", [h])])
    _step(opt)
    opt.state[h]["step"] = torch.tensor([1.0, 2.0])
    with pytest.raises(OptimizerError, match="'step'.*invalid counter"):
        rebuild_optimizer(opt, cfg, [ParamGroupSpec("host", [h])])
    opt.state[h]["step"] = torch.tensor(1.0)
    opt.state[h]["exp_avg"] = opt.state[h]["exp_avg"].double()
    with pytest.raises(OptimizerError, match="exp_avg"):
        rebuild_optimizer(opt, cfg, [ParamGroupSpec("host", [h])])


def test_rebuild_refuses_a_different_optimizer_kind() -> None:
    h = _param(2)
    opt = build_optimizer(TrainerConfig(optimizer="sgd"), [ParamGroupSpec("host", [h])])
    with pytest.raises(OptimizerError, match="SGD to AdamW"):
        rebuild_optimizer(opt, TrainerConfig(optimizer="adamw"), [ParamGroupSpec("host", [h])])


def test_rebuild_refuses_unnamed_old_groups_and_bad_new_groups() -> None:
    h = _param(2)
    unnamed = torch.optim.SGD([h], lr=0.1)
    with pytest.raises(OptimizerError, match="missing or duplicate name"):
        rebuild_optimizer(unnamed, TrainerConfig(), [ParamGroupSpec("host", [h])])
    opt = build_optimizer(TrainerConfig(), [ParamGroupSpec("host", [h])])
    with pytest.raises(OptimizerError, match="'host' and 'seed:s1'"):
        rebuild_optimizer(opt, TrainerConfig(), [ParamGroupSpec("host", [h]), ParamGroupSpec("seed:s1", [h])])


def test_no_stale_reference_to_the_old_optimizer() -> None:
    cfg = TrainerConfig(optimizer="adamw", lr=0.01)
    h = _param(3)
    opt = build_optimizer(cfg, [ParamGroupSpec("host", [h])])
    _step(opt)
    old_state = opt.state[h]
    ref = weakref.ref(opt)
    new, report = rebuild_optimizer(opt, cfg, [ParamGroupSpec("host", [h])])
    assert new.state[h] is not old_state
    assert new.param_groups[0] is not opt.param_groups[0]
    del opt
    gc.collect()
    assert ref() is None, "something kept the old optimizer alive"
    _step(new, 1)
    assert float(new.state[h]["step"]) == 3.0 and float(old_state["step"]) == 2.0


# ---------------------------------------------------------------------------------------------- LR


def _sched(total: int = 1000, **kw: Any) -> LRSchedule:
    return LRSchedule(TrainerConfig(**kw), total)


def test_cosine_past_t_max_floor() -> None:
    s = _sched(lr=0.1, min_lr=0.01, lr_policy="cosine", cosine_t_max=100, cosine_past_t_max="floor")
    assert s.factor(0) == 1.0
    assert s.factor(50) == pytest.approx(0.55)
    assert s.factor(100) == pytest.approx(0.1)
    assert s.factor(101) == pytest.approx(0.1)
    assert s.factor(10**9) == pytest.approx(0.1)


def test_cosine_past_t_max_restart() -> None:
    s = _sched(lr=0.1, min_lr=0.01, lr_policy="cosine", cosine_t_max=100, cosine_past_t_max="restart",
               warmup_steps=10, warmup_start_factor=0.5)
    assert s.factor(10) == 1.0
    assert s.factor(60) == pytest.approx(0.55)
    assert s.factor(109) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert s.factor(110) == 1.0  # a new cycle starts
    assert s.factor(160) == pytest.approx(0.55)
    assert s.factor(10 + 100 * 7 + 25) == pytest.approx(s.factor(10 + 25))


def test_cosine_t_max_defaults_to_the_rest_of_the_run() -> None:
    s = _sched(total=110, lr_policy="cosine", warmup_steps=10, min_lr=0.0, cosine_t_max=0,
               cosine_past_t_max="floor")
    assert s.t_max == 100
    assert s.factor(60) == pytest.approx(0.5)
    assert s.factor(110) == 0.0
    with pytest.raises(OptimizerError, match="cosine period"):
        _sched(total=10, lr_policy="cosine", warmup_steps=10, cosine_t_max=0)


def test_cosine_min_lr_above_lr_is_an_error() -> None:
    # the schema refuses it (a config error naming the key) ...
    with pytest.raises(ValueError, match="min_lr"):
        _sched(lr=0.1, min_lr=0.2, lr_policy="cosine")
    # ... and the schedule refuses it too if an unvalidated config gets through
    with pytest.raises(OptimizerError, match="min_lr"):
        LRSchedule(TrainerConfig.model_construct(**{**TrainerConfig().model_dump(), "lr": 0.1, "min_lr": 0.2,
                                                    "lr_policy": "cosine"}),
                   1000)


def test_warmup_from_near_zero_has_no_hidden_floor() -> None:
    s = _sched(lr_policy="constant", warmup_steps=100, warmup_start_factor=1e-6)
    assert s.factor(0) == 1e-6
    assert s.factor(50) == pytest.approx(1e-6 + (1 - 1e-6) * 0.5)
    assert s.factor(99) < 1.0
    assert s.factor(100) == 1.0
    opt = build_optimizer(TrainerConfig(lr=0.1), [ParamGroupSpec("host", [_param(2)])])
    assert s.apply(opt, 0) == 1e-6
    assert opt.param_groups[0]["lr"] == 0.1 * 1e-6


def test_step_decay_values() -> None:
    s = _sched(lr_policy="step", warmup_steps=5, warmup_start_factor=0.2, step_size=10, step_gamma=0.5)
    assert s.factor(0) == 0.2
    assert [s.factor(n) for n in (5, 14, 15, 24, 25, 35)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.125]


def test_apply_sets_every_group_from_base_lr_by_global_step() -> None:
    s = _sched(lr_policy="step", step_size=10, step_gamma=0.1)
    opt = build_optimizer(TrainerConfig(lr=0.1), [ParamGroupSpec("host", [_param(2)]),
                                                  ParamGroupSpec("seed:s1", [_param(2)], lr=1.0)])
    assert s.apply(opt, 25) == pytest.approx(0.01)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.001, 0.01])
    # Pure in the step: going back (resume/rollback) gives back the same lr, with no history.
    s.apply(opt, 3)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 1.0])
    assert [LRSchedule(TrainerConfig(lr_policy="step", step_size=10, step_gamma=0.1), 1000).factor(n)
            for n in (25, 3)] == [s.factor(25), s.factor(3)]


@pytest.mark.parametrize("missing", ["base_lr", "lr"])
def test_group_without_lr_is_an_error(missing: str) -> None:
    opt = build_optimizer(TrainerConfig(lr=0.1), [ParamGroupSpec("host", [_param(2)]),
                                                  ParamGroupSpec("seed:s1", [_param(2)])])
    del opt.param_groups[1][missing]
    with pytest.raises(OptimizerError, match=f"'seed:s1' has no '{missing}'"):
        _sched(lr_policy="constant").apply(opt, 0)
    assert opt.param_groups[0]["lr"] == 0.1  # nothing changed


def test_group_with_bad_base_lr_is_an_error() -> None:
    opt = build_optimizer(TrainerConfig(lr=0.1), [ParamGroupSpec("host", [_param(2)])])
    opt.param_groups[0]["base_lr"] = float("nan")
    with pytest.raises(OptimizerError, match="invalid base_lr"):
        _sched(lr_policy="constant").apply(opt, 0)


def test_unknown_policy_is_an_error() -> None:
    with pytest.raises(OptimizerError, match="unknown LR policy 'sawtooth'"):
        LRSchedule(TrainerConfig.model_construct(lr_policy="sawtooth"), 100)
    with pytest.raises(OptimizerError, match="cosine_past_t_max"):
        LRSchedule(TrainerConfig.model_construct(lr_policy="cosine", cosine_past_t_max="bounce"), 100)
    with pytest.raises(OptimizerError, match="unknown optimizer"):
        build_optimizer(TrainerConfig.model_construct(optimizer="lion"), [ParamGroupSpec("h", [_param(1)])])


def test_bad_steps_are_errors() -> None:
    s = _sched(lr_policy="constant")
    for bad in (-1, 1.5, True):
        with pytest.raises(OptimizerError, match="global optimizer step"):
            s.factor(bad)  # type: ignore[arg-type]
    with pytest.raises(OptimizerError, match="total_steps"):
        LRSchedule(TrainerConfig(), -1)


_cfgs = st.builds(
    dict,
    lr=st.floats(1e-6, 10.0),
    min_frac=st.floats(0.0, 1.0),
    lr_policy=st.sampled_from(["constant", "cosine", "step"]),
    warmup_steps=st.integers(0, 1000),
    warmup_start_factor=st.floats(1e-12, 1.0, exclude_min=False),
    cosine_t_max=st.integers(0, 1000),
    cosine_past_t_max=st.sampled_from(["floor", "restart"]),
    step_size=st.integers(1, 500),
    step_gamma=st.floats(1e-3, 1.0),
    extra=st.integers(1, 5000),
)


@settings(max_examples=300, deadline=None)
@given(kw=_cfgs, steps=st.lists(st.integers(0, 10**12), min_size=1, max_size=20))
def test_factor_is_finite_and_bounded(kw: dict[str, Any], steps: list[int]) -> None:
    lr = kw.pop("lr")
    frac = kw.pop("min_frac")
    extra = kw.pop("extra")
    cfg = TrainerConfig(lr=lr, min_lr=lr * frac, **kw)
    s = LRSchedule(cfg, cfg.warmup_steps + extra)
    for n in steps + [0, cfg.warmup_steps, cfg.warmup_steps + (s.t_max or 1)]:
        f = s.factor(n)
        assert math.isfinite(f) and 0.0 <= f <= 1.0, (n, f)
        if n < cfg.warmup_steps:
            assert f >= cfg.warmup_start_factor
        elif cfg.lr_policy == "cosine":
            assert f >= s.floor
        assert s.factor(n) == f  # pure


def test_linear_falls_from_1_after_the_warm_up_to_min_lr_at_the_runs_end() -> None:
    s = _sched(100, lr_policy="linear", lr=0.1, min_lr=0.01, warmup_steps=10, warmup_start_factor=0.5)
    assert s.factor(0) == 0.5 and s.factor(10) == 1.0
    assert s.factor(55) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the 90 steps after the warm-up
    assert s.factor(100) == pytest.approx(0.1) and s.factor(500) == pytest.approx(0.1)  # the floor, not below
    factors = [s.factor(n) for n in range(10, 101)]
    assert all(a >= b for a, b in zip(factors, factors[1:], strict=False))


def test_inverse_sqrt_is_1_where_the_warm_up_ends_and_falls_as_one_over_root_step() -> None:
    s = _sched(1000, lr_policy="inverse_sqrt", warmup_steps=16)
    assert s.factor(16) == 1.0 and s.factor(16 + 48) == pytest.approx(0.5)  # sqrt(16 / 64)
    assert _sched(1000, lr_policy="inverse_sqrt").factor(3) == pytest.approx(0.5)  # no warm-up: W = 1


def _torch_lrs(make: Any, steps: int, lr: float = 0.1) -> list[float]:
    """The LR torch's own scheduler gives at each step (what Esper's pure-step math must reproduce)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = make(opt)
    out = []
    for i in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        if i < steps - 1:
            sched.step()
    return out


@pytest.mark.parametrize("power", [1.0, 2.0, 0.5])
def test_polynomial_is_torchs_polynomial_lr(power: float) -> None:
    s = _sched(400, lr_policy="polynomial", poly_power=power, lr=0.1, min_lr=0.0)
    ours = [0.1 * s.factor(i) for i in range(400)]
    theirs = _torch_lrs(lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=400, power=power), 400)
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-15)
    floor = _sched(400, lr_policy="polynomial", lr=0.1, min_lr=0.01)
    assert floor.factor(0) == 1.0 and floor.factor(400) == pytest.approx(0.1)
    assert floor.factor(10**6) == floor.factor(400)


@pytest.mark.parametrize("pct, div", [(0.3, 25.0), (0.1, 10.0)])
def test_onecycle_is_torchs_one_cycle_lr(pct: float, div: float) -> None:
    final = 1e4
    s = _sched(500, lr_policy="onecycle", lr=0.1, min_lr=0.1 / (div * final), onecycle_pct_start=pct,
               onecycle_div_factor=div)
    ours = [0.1 * s.factor(i) for i in range(500)]
    theirs = _torch_lrs(lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=0.1, total_steps=500, pct_start=pct, div_factor=div, final_div_factor=final,
        cycle_momentum=False), 500)
    assert ours == pytest.approx(theirs, rel=1e-9)
    assert max(ours) == pytest.approx(0.1) and ours[0] == pytest.approx(0.1 / div)


def test_onecycle_refuses_a_warm_up_and_a_run_too_short_for_both_phases() -> None:
    with pytest.raises(ValueError, match="warmup_steps = 0"):
        TrainerConfig(lr_policy="onecycle", warmup_steps=10)
    with pytest.raises(OptimizerError, match="rise and a fall"):
        _sched(2, lr_policy="onecycle", onecycle_pct_start=0.3)
