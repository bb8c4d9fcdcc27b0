"""Gates G0-G5 (SPEC §3.2): pure functions of explicit inputs, each returning a GateResult with a reason."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class GateResult:
    gate: str
    passed: bool
    reason: str
    attributes: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"gate": self.gate, "passed": self.passed, "reason": self.reason, "attributes": dict(self.attributes)}


def _result(gate: str, problems: list[str], ok: str, **attrs: Any) -> GateResult:
    if problems:
        return GateResult(gate, False, "; ".join(problems), attrs)
    return GateResult(gate, True, ok, attrs)


def g0_sanity(*, blueprint: str, known: bool, n_params: int, bounds: tuple[int, int], budget: int,
              finite: bool, out_shape: tuple[int, ...] | None, expected_shape: tuple[int, ...],
              incompatible: str = "", slot_shape: str = "") -> GateResult:
    """Blueprint known and accepting the slot's kind (``incompatible`` says why not), parameters within bounds
    and budget and finite, output shape (the full batched shape) equal to the slot's."""
    problems = []
    if not known:
        problems.append(f"unknown blueprint {blueprint!r}")
    elif incompatible:
        problems.append(incompatible)
    else:
        lo, hi = bounds
        if not lo <= n_params <= hi:
            problems.append(f"{n_params} parameters outside declared bounds [{lo}, {hi}]")
        if n_params > budget:
            problems.append(f"{n_params} parameters exceed the budget {budget}")
        if not finite:
            problems.append("non-finite parameters")
        if out_shape != expected_shape:
            got = list(out_shape) if out_shape is not None else "no tensor"
            problems.append(f"output shape {got} != slot shape {list(expected_shape)}")
    return _result("G0", problems, "sane", blueprint=blueprint, params=n_params, budget=budget,
                   slot_shape=slot_shape)


def g1_gradient_health(*, seed_grad_norm: float, seed_grads_finite: bool, isolation_cosine: float,
                       max_cosine: float, host_grads_unchanged: bool, host_buffers_unchanged: bool = True,
                       buffers_restored: int = 0) -> GateResult:
    """A probe step gives finite, non-zero seed gradients and no leak into the host: neither its gradients nor
    its buffers (BatchNorm statistics and the like; ``buffers_restored`` counts those the probe's forwards moved
    and Esper put back)."""
    problems = []
    if not seed_grads_finite:
        problems.append("non-finite seed gradients")
    elif seed_grad_norm <= 0.0:
        problems.append("seed gradients are all zero")
    if isolation_cosine > max_cosine:
        problems.append(f"isolation violated: host/seed gradient cosine {isolation_cosine:.3g} > {max_cosine:.3g}")
    if not host_grads_unchanged:
        problems.append("probe changed host gradients")
    if not host_buffers_unchanged:
        problems.append("probe changed host buffers")
    return _result("G1", problems, "healthy gradients, isolated", seed_grad_norm=seed_grad_norm,
                   isolation_cosine=isolation_cosine, buffers_restored=buffers_restored)


def g2_stability(*, epochs_in_training: int, min_epochs: int, loss_start: float, loss_now: float,
                 min_improvement: float, step_latency_ms: float, latency_budget_ms: float) -> GateResult:
    """After ``min_epochs`` the seed's own loss improved by at least ``min_improvement`` (relative)."""
    problems = []
    if epochs_in_training < min_epochs:
        problems.append(f"only {epochs_in_training}/{min_epochs} epochs in TRAINING")
    if not (math.isfinite(loss_start) and math.isfinite(loss_now)):
        problems.append("non-finite seed loss")
        improvement = float("nan")
    else:
        improvement = (loss_start - loss_now) / max(abs(loss_start), 1e-12)
        if improvement < min_improvement:
            problems.append(f"seed loss improved {improvement:.2%} < {min_improvement:.2%}")
    if step_latency_ms > latency_budget_ms:
        problems.append(f"seed step latency {step_latency_ms:.1f} ms > {latency_budget_ms:.1f} ms")
    return _result("G2", problems, f"seed loss improved {improvement:.2%}", improvement=improvement,
                   step_latency_ms=step_latency_ms)


def g3_interface(*, alpha: float, out_shape: tuple[int, ...], host_shape: tuple[int, ...], out_dtype: str,
                 host_dtype: str, out_device: str, host_device: str, required_layers: list[str],
                 present_layers: list[str]) -> GateResult:
    """Alpha reached exactly 1.0, output matches the host activation, required host layers exist."""
    problems = []
    if alpha != 1.0:
        problems.append(f"alpha is {alpha}, not 1.0")
    if out_shape != host_shape:
        problems.append(f"output shape {out_shape} != host {host_shape}")
    if out_dtype != host_dtype:
        problems.append(f"output dtype {out_dtype} != host {host_dtype}")
    if out_device != host_device:
        problems.append(f"output device {out_device} != host {host_device}")
    missing = [name for name in required_layers if name not in present_layers]
    if missing:
        problems.append(f"required host layers missing: {missing}")
    return _result("G3", problems, "interface matches", alpha=alpha)


def g4_system_impact(*, loss_with: float, loss_without: float, min_improvement: float,
                     degraded: bool) -> GateResult:
    """Counterfactual: validation loss without the seed minus with it is at least ``min_improvement``."""
    problems = []
    gain = loss_without - loss_with
    if not (math.isfinite(loss_with) and math.isfinite(loss_without)):
        problems.append("non-finite counterfactual losses")
    elif gain < min_improvement:
        problems.append(f"counterfactual gain {gain:.4f} < {min_improvement:.4f}")
    if degraded:
        problems.append("seed is running degraded (fallback or failed load)")
    return _result("G4", problems, f"counterfactual gain {gain:.4f}", gain=gain, loss_with=loss_with,
                   loss_without=loss_without)


def g5_reset_clean(*, module_detached: bool, optimizer_groups_removed: bool, counters_cleared: bool) -> GateResult:
    """The slot holds no module, no optimizer group and no stale counters."""
    problems = []
    if not module_detached:
        problems.append("module still attached")
    if not optimizer_groups_removed:
        problems.append("optimizer groups still present")
    if not counters_cleared:
        problems.append("counters not cleared")
    return _result("G5", problems, "slot clean")
