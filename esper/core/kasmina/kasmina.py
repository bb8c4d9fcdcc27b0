"""Kasmina: slots on the host, blueprint instantiation, gates, and the seed lifecycle's automatic advances.

A Stateful part of the run (``state_dict``/``load_state_dict``): the seeds' records and their tensors.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

import esper.core.kasmina.gates as gates
import esper.core.kasmina.sandbox as sandbox
from esper.core.config import SeedsConfig
from esper.core.errors import CheckpointError
from esper.core.kasmina.blending import BlendSpec, parse_blend
from esper.core.kasmina.blueprints import BlueprintRegistry, param_count
from esper.core.kasmina.checks import check_slots, slot_shapes
from esper.core.kasmina.inherit import InheritError
from esper.core.kasmina.isolation import IsolationMonitor, upstream_params
from esper.core.kasmina.kinds import SlotShape
from esper.core.kasmina.seed_pass import SeedPasses
from esper.core.kasmina.slot import LIVE, Mode, SeedSlot, SeedStats
from esper.core.model.host import HostProbe, resumes_from, select_output
from esper.core.model.optim import ParamGroupSpec
from esper.statemachines import SEED, StrictMachine, TransitionRecord

Emit = Callable[..., Any]
Build = Callable[[str, SlotShape], nn.Module]  # (blueprint, slot shape) -> a fresh module: the load manager's get
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# bypassed slot names -> the task's validation metrics: val_loss and every val_<metric>
Evaluator = Callable[[frozenset[str]], dict[str, float]]


class Kasmina(SeedPasses):
    """Owns the slots of one host. Every stage change goes through the slot's strict machine.

    ``probe`` is what one forward of a real example batch showed (each slot layer's output shape); ``registry``
    names the blueprints; ``build`` makes a module from one (the run passes its blueprint load manager's
    ``get``: cache + prefetch). Without them, blueprints are built straight from the registry.
    """

    def __init__(self, seeds: SeedsConfig, host: nn.Module, probe: HostProbe, emit: Emit, *, run_seed: int,
                 output: str | None, fossilize_min_improvement: float, registry: BlueprintRegistry | None = None,
                 build: Build | None = None) -> None:
        """``run_seed``: run.seed; ``output``: host.output; ``fossilize_min_improvement``: G4's bar (controller)."""
        self.scfg = seeds
        self.run_seed = run_seed
        self.fossilize_min_improvement = fossilize_min_improvement
        self.host = host
        self.emit = emit
        self.registry = registry if registry is not None else BlueprintRegistry(seeds)
        self.spec: BlendSpec = parse_blend(seeds.blend)
        reg = self.registry
        self.build = build if build is not None else (lambda name, shape: reg.build(name, shape, run_seed))
        # problems a slot would only meet mid-run are config errors now (exit 3, before any training)
        shapes = slot_shapes(seeds.slots, probe)
        check_slots(seeds, run_seed, self.registry, self.spec, shapes, probe)
        self.output = output
        resumable = {layer: resumes_from(host, layer, probe.example, self.output)
                     for layer in {sc.layer for sc in seeds.slots}}
        self.slots: dict[str, SeedSlot] = {}
        modules = dict(host.named_modules())
        self.layers = {sc.layer: modules[sc.layer] for sc in seeds.slots}  # what an inheriting seed copies
        for sc in seeds.slots:
            slot = SeedSlot(sc.name, sc.layer, shapes[sc.name], self.spec, self._observer, resumable[sc.layer])
            self.slots[sc.name] = slot
            modules[sc.layer].register_forward_hook(slot.hook)  # for the host's lifetime
        self._upstream: dict[str, list[nn.Parameter]] = {}
        self.unfit: dict[str, str] = {}  # slot -> why no allowed blueprint can grow there under the budget
        for name, slot in self.slots.items():
            why = self._unfit(slot)
            if why:
                self.unfit[name] = why
                emit("kasmina", "slot.unfit", "WARNING", slot=name, layer=slot.layer, reason=why)

    def _unfit(self, slot: SeedSlot) -> str:
        """Why no blueprint of seeds.blueprints fits ``slot`` within the budget ('' when one does), naming the
        smallest budget that would let one grow there."""
        sizes = self.candidate_params(slot.name)
        budget = self.scfg.budget
        if not sizes or min(sizes.values()) <= budget:
            return ""
        smallest = min(sizes, key=lambda b: sizes[b])
        listed = ", ".join(f"{b} {n:,}" for b, n in sizes.items())
        return (f"slot {slot.name!r} ({slot.layer}, {slot.shape}): no blueprint fits seeds.param_budget "
                f"{budget:,} (parameters there: {listed}); the smallest budget that fits is {sizes[smallest]:,} "
                f"({smallest}), or add a smaller blueprint such as conv_bottleneck to seeds.blueprints")

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Host forward with every slot applied; confidence mode first gets the host's own logits."""
        if self.spec.needs_logits and any(s.module is not None for s in self.slots.values()):
            with torch.no_grad(), self.modes(Mode.BYPASS, self.slots), sandbox.untouched(self.host):
                logits = self.host_forward(x)
            for s in self.slots.values():
                s.logits = logits
        return self.host_forward(x)

    def host_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The host's own forward (slot hooks apply), reduced to the tensor ``host.output`` names."""
        out: torch.Tensor = select_output(self.host(x), self.output)
        return out

    @contextmanager
    def modes(self, mode: Mode, names: Any) -> Iterator[None]:
        """The named slots in ``mode`` for the duration (BYPASS for a counterfactual, SUBSTITUTE for a seed pass)."""
        slots = [self.slots[n] for n in names]
        prev = [s.mode for s in slots]
        for s in slots:
            s.mode = mode
        try:
            yield
        finally:
            for s, m in zip(slots, prev, strict=True):
                s.mode = m

    # -------------------------------------------------------------- parameters
    def param_groups(self) -> list[ParamGroupSpec]:
        """Host group (host + fossilized seeds) and one group per live seed."""
        host_params = list(self.host.parameters())
        groups = []
        for s in self.slots.values():
            if s.module is None:
                continue
            if s.stage == "FOSSILIZED":
                host_params.extend(s.params())
            else:
                groups.append(ParamGroupSpec(name=f"seed:{s.name}", params=s.params()))
        return [ParamGroupSpec(name="host", params=host_params), *groups]

    def seed_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for s in self.slots.values():
            if s.module is not None:
                head = s.name + "."
                for k, v in s.module.state_dict().items():
                    out[head + k] = v
        return out

    def compatible(self, slot_name: str) -> list[str]:
        """The blueprints of ``seeds.blueprints`` that accept this slot's kind (what the controller may propose)."""
        return self.registry.compatible(self.slots[slot_name].shape)

    def candidate_params(self, slot_name: str) -> dict[str, int]:
        """Parameter count each compatible blueprint would have in this slot (risk stage's budget check)."""
        s = self.slots[slot_name]
        return {b: self.registry.size(b, s.shape, self.layers[s.layer]) for b in self.registry.compatible(s.shape)}

    def slot_view(self, slot_name: str) -> dict[str, Any]:
        """What the controller is told about a slot's layout: kind, shape (one sample's), the compatible
        blueprints and the parameter count each would have there (plain data: Tamiyo is torch-free)."""
        s = self.slots[slot_name]
        return {"kind": s.shape.kind, "shape": list(s.shape.shape), "compatible": self.compatible(slot_name),
                "candidate_params": self.candidate_params(slot_name)}

    def prefetch_keys(self) -> list[tuple[str, SlotShape]]:
        """Every (blueprint, slot shape) the controller may germinate: what to prefetch at the start."""
        keys: list[tuple[str, SlotShape]] = []
        for s in self.slots.values():
            keys.extend((b, s.shape) for b in self.compatible(s.name)
                        if (b, s.shape) not in keys and not self.registry.inherits(b))  # copied at germination
        return keys

    def total_params(self) -> int:
        return param_count(self.host) + sum(param_count(s.module) for s in self.slots.values() if s.module)

    # --------------------------------------------------------------- commands
    def germinate(self, slot_name: str, blueprint: str, reason: str) -> gates.GateResult:
        """DORMANT -> GERMINATED through G0. Raises GateRejected / IllegalTransition; nothing changes then."""
        slot = self.slots[slot_name]
        slot.machine.require("germinate")
        known = blueprint in self.registry and blueprint in self.scfg.blueprints
        refusal = self.registry[blueprint].refusal(slot.shape) if known else ""
        module: nn.Module | None = None
        out_shape: tuple[int, ...] | None = None
        finite = False
        n = 0
        bounds = (0, 0)
        if known and not refusal:  # an incompatible blueprint is never built for the slot
            try:
                module = self._make(blueprint, slot, slot.last_input)
            except InheritError as exc:
                refusal = str(exc)
        if module is not None:
            n = param_count(module)
            bounds = (n, n) if self.registry.inherits(blueprint) else self.registry[blueprint].bounds(slot.shape)
            finite = all(bool(torch.isfinite(p).all()) for p in module.parameters())
            with torch.no_grad():
                out = module(slot.shape.zeros(2))
            out_shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        result = gates.g0_sanity(blueprint=blueprint, known=known, n_params=n, bounds=bounds,
                                 budget=self.scfg.budget, finite=finite, out_shape=out_shape,
                                 expected_shape=slot.shape.batched(2), incompatible=refusal,
                                 slot_shape=str(slot.shape))
        self._gate_event(slot, "germinate", result)

        def attach() -> None:
            slot.module = module
            slot.blueprint = blueprint
            slot.germinations += 1
            slot.seed_id = f"{slot.name}-{slot.germinations}"
            slot.stats.clear()

        slot.machine.fire("germinate", reason=reason, gate=result, prepare=attach)
        return result

    def probe_g1(self, slot_name: str, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> gates.GateResult:
        """G1 on a probe batch: finite non-zero seed gradients, no leak into host parameters upstream."""
        slot = self.slots[slot_name]
        upstream = self._upstream_params(slot, x)
        monitor = IsolationMonitor(upstream, self.scfg.isolation_sample, self.run_seed)
        before = [None if p.grad is None else p.grad.clone() for p in self.host.parameters()]
        buffers = sandbox.snapshot(self.host)
        with sandbox.untouched(self.host) as restored:
            with self.modes(Mode.BYPASS, [slot.name]):
                host_loss = loss_fn(self.forward(x), y)
            host_grads = torch.autograd.grad(host_loss, upstream, allow_unused=True) if upstream else []
            seed_loss = loss_fn(self._probe_forward(slot, x), y)
            seed_params = slot.params()
            grads = torch.autograd.grad(seed_loss, [*seed_params, *upstream], allow_unused=True)
        seed_grads, leak = grads[: len(seed_params)], grads[len(seed_params):]
        finite = all(g is not None and bool(torch.isfinite(g).all()) for g in seed_grads)
        norm = float(sum(float(g.norm()) for g in seed_grads if g is not None))
        cosine = monitor.cosine(monitor.sample(host_grads), monitor.sample(leak)) if upstream else 0.0
        after = [None if p.grad is None else p.grad for p in self.host.parameters()]
        unchanged = all((a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
                        for a, b in zip(before, after, strict=True))
        result = gates.g1_gradient_health(seed_grad_norm=norm, seed_grads_finite=finite, isolation_cosine=cosine,
                                          max_cosine=self.scfg.isolation_max_cosine, host_grads_unchanged=unchanged,
                                          host_buffers_unchanged=sandbox.buffers_equal(self.host, buffers),
                                          buffers_restored=len(restored.moved))
        result.attributes["sample_size"] = monitor.sample_size
        if cosine > self.scfg.isolation_max_cosine:
            self.emit("kasmina", "isolation.violation", "ERROR", slot=slot.name, cosine=cosine,
                      seed_id=slot.seed_id)
        return result

    def _probe_forward(self, slot: SeedSlot, x: torch.Tensor) -> torch.Tensor:
        # SUBSTITUTE only acts in TRAINING; a GERMINATED seed is probed as if it were training.
        module = slot.module
        assert module is not None

        def substitute(_m: nn.Module, _i: object, out: torch.Tensor) -> torch.Tensor:
            x_in = out.detach() if slot.detach_input else out
            return slot.blend(x_in, module(x_in), 1.0, seed_input=x_in)

        handle = dict(self.host.named_modules())[slot.layer].register_forward_hook(substitute)
        try:
            with self.modes(Mode.BYPASS, [slot.name]):
                return self.forward(x)
        finally:
            handle.remove()

    def gate_failed(self, slot_name: str, trigger: str, result: gates.GateResult) -> None:
        """Record a gate that refused ``trigger`` (the caller culls the seed)."""
        self._gate_event(self.slots[slot_name], trigger, result)

    def start_training(self, slot_name: str, result: gates.GateResult, reason: str) -> None:
        slot = self.slots[slot_name]
        self._gate_event(slot, "start_training", result)
        slot.machine.fire("start_training", reason=reason, gate=result, prepare=slot.stats.clear)
        if self.scfg.skip_training and slot.blueprint is not None and self.registry.inherits(slot.blueprint):
            # it starts from trained weights: isolated training would spend compute to learn what it has
            skipped = gates.GateResult("G2", True, "skipped: the seed is a copy of the trained layer "
                                       "(seeds.skip_training)", {"skipped": True})
            self._auto(slot, "start_blending", skipped, [])

    def cull(self, slot_name: str, reason: str) -> None:
        """Remove a live seed from the forward pass (its optimizer group goes with the next rebuild)."""
        slot = self.slots[slot_name]
        slot.machine.require("cull")

        def detach() -> None:
            slot.module = None

        slot.machine.fire("cull", reason=reason, prepare=detach)
        slot.machine.fire("embargo", reason=f"cool down {self.scfg.embargo_epochs} epoch(s) after cull",
                          prepare=lambda: setattr(slot.stats, "embargo_left", self.scfg.embargo_epochs))
        if self.scfg.embargo_epochs == 0:
            self._reset(slot)

    def fossilize(self, slot_name: str, reason: str) -> gates.GateResult:
        """PROBATIONARY -> FOSSILIZED through G4 (counterfactual measured at the last epoch end)."""
        slot = self.slots[slot_name]
        slot.machine.require("fossilize")
        cf = slot.stats.counterfactual
        result = gates.g4_system_impact(loss_with=cf.get("loss_with", float("nan")),
                                        loss_without=cf.get("loss_without", float("nan")),
                                        min_improvement=self.fossilize_min_improvement,
                                        degraded=slot.module is None)
        self._gate_event(slot, "fossilize", result)
        slot.machine.fire("fossilize", reason=reason, gate=result)
        return result

    # ------------------------------------------------------------- automatic
    def after_step(self) -> None:
        for s in self.slots.values():
            s.observe_blend()  # this step's alpha and gate sparsity, before the ramp moves on
            if s.stage == "BLENDING":
                s.stats.alpha_step += 1

    def end_epoch(self, evaluate: Evaluator) -> list[str]:
        """Advance stages whose conditions are met; returns the names of slots whose params changed."""
        changed: list[str] = []
        for slot in self.slots.values():
            stage = slot.stage
            st = slot.stats
            if stage in LIVE:
                st.epochs_in_stage += 1
            if stage == "TRAINING":
                if st.loss_count:
                    st.epoch_losses.append(st.loss_sum / st.loss_count)
                latency = st.latency_ms_sum / max(st.loss_count, 1)
                st.loss_sum, st.loss_count, st.latency_ms_sum = 0.0, 0, 0.0
                if st.epochs_in_stage >= self.scfg.min_training_epochs and st.epoch_losses:
                    result = gates.g2_stability(
                        epochs_in_training=st.epochs_in_stage, min_epochs=self.scfg.min_training_epochs,
                        loss_start=st.epoch_losses[0], loss_now=st.epoch_losses[-1],
                        min_improvement=self.scfg.g2_min_improvement, step_latency_ms=latency,
                        latency_budget_ms=self.scfg.max_step_latency_ms)
                    self._auto(slot, "start_blending", result, changed)
            elif stage == "BLENDING" and slot.alpha == 1.0:
                out = slot.last_output
                ref = slot.last_input
                present = list(dict(self.host.named_modules()))
                result = gates.g3_interface(
                    alpha=slot.alpha,
                    out_shape=tuple(out.shape) if out is not None else (),
                    host_shape=tuple(ref.shape) if ref is not None else (),
                    out_dtype=str(out.dtype) if out is not None else "-",
                    host_dtype=str(ref.dtype) if ref is not None else "-",
                    out_device=str(out.device) if out is not None else "-",
                    host_device=str(ref.device) if ref is not None else "-",
                    required_layers=[slot.layer], present_layers=present)
                self._auto(slot, "start_shadowing", result, changed)
            elif stage == "SHADOWING" and st.epochs_in_stage >= self.scfg.shadowing_epochs:
                slot.machine.fire("start_probation", reason=f"stable for {st.epochs_in_stage} epoch(s) at alpha 1")
                st.epochs_in_stage = 0
            elif stage == "EMBARGOED":
                st.embargo_left -= 1
                if st.embargo_left <= 0:
                    self._reset(slot)
        for slot in self.slots.values():
            if slot.stage == "PROBATIONARY":
                loss_with = evaluate(frozenset())["val_loss"]
                loss_without = evaluate(frozenset({slot.name}))["val_loss"]
                slot.stats.counterfactual = {"loss_with": loss_with, "loss_without": loss_without,
                                             "gain": loss_without - loss_with}
        return changed

    def _auto(self, slot: SeedSlot, trigger: str, result: gates.GateResult, changed: list[str]) -> None:
        """An automatic advance: a failed G1-G4 culls the seed (SPEC §3.2)."""
        self._gate_event(slot, trigger, result)
        if result.passed:
            slot.machine.fire(trigger, reason=result.reason, gate=result)
            slot.stats.epochs_in_stage = 0
            return
        self.cull(slot.name, reason=f"{result.gate} failed on {trigger}: {result.reason}")
        changed.append(slot.name)

    def _reset(self, slot: SeedSlot) -> None:
        def clear() -> None:
            slot.module = None
            slot.blueprint = None
            slot.seed_id = None
            slot.stats.clear()

        slot.machine.fire("reset", reason="embargo expired", prepare=clear)
        result = gates.g5_reset_clean(module_detached=slot.module is None,
                                      optimizer_groups_removed=not any(True for _ in slot.params()),
                                      counters_cleared=slot.stats.is_clear())
        self._gate_event(slot, "reactivate", result)
        slot.machine.fire("reactivate", reason="slot clean", gate=result)

    # ---------------------------------------------------------------- helpers
    def _make(self, blueprint: str, slot: SeedSlot, activation: torch.Tensor | None = None) -> nn.Module:
        """A seed module: built through ``build`` (cache, prefetch), or copied from the slot's layer."""
        if not self.registry.inherits(blueprint):
            return self.build(blueprint, slot.shape)
        sample = activation.detach()[:2] if activation is not None else None
        return self.registry.make(blueprint, slot.shape, self.run_seed, self.layers[slot.layer], sample)

    def _upstream_params(self, slot: SeedSlot, x: torch.Tensor) -> list[nn.Parameter]:
        if slot.layer not in self._upstream:
            with sandbox.untouched(self.host):
                self._upstream[slot.layer] = upstream_params(self.host, slot.layer, x[:2],
                                                             lambda: self.modes(Mode.BYPASS, self.slots),
                                                             self.host_forward)
        return self._upstream[slot.layer]

    def _observer(self, record: TransitionRecord) -> None:
        level = "WARNING" if record.dest == "CULLED" else "INFO"
        self.emit("kasmina", "seed.transition", level, slot=record.subject, transition=record.to_dict())

    def _gate_event(self, slot: SeedSlot, trigger: str, result: gates.GateResult) -> None:
        self.emit("kasmina", "gate.result", "INFO" if result.passed else "WARNING", slot=slot.name,
                  seed_id=slot.seed_id, trigger=trigger, **result.to_dict())

    def records(self) -> list[dict[str, Any]]:
        return [s.record() for s in self.slots.values()]

    # ---------------------------------------------------------------- Stateful
    def state_dict(self) -> dict[str, Any]:
        """Every slot's record under ``seeds``, and each live module's tensors as ``<slot>.<key>`` (live)."""
        return {"seeds": self.records(), **self.seed_tensors()}

    def tensors(self) -> dict[str, torch.Tensor]:
        return self.seed_tensors()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put every slot back as captured. A live module that is the same seed (same id and blueprint) gets the
        tensors copied in place; any other is rebuilt through ``build``. Tensors are copied, never kept."""
        records = {r["slot"]: r for r in state["seeds"]}
        if set(records) != set(self.slots):
            raise CheckpointError(f"checkpoint slots {sorted(records)} != configured slots {sorted(self.slots)}")
        tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        for name, slot in self.slots.items():
            rec = records[name]
            seed_sd = {k.removeprefix(f"{name}."): v for k, v in tensors.items() if k.startswith(f"{name}.")}
            if not seed_sd:
                slot.module = None
            elif rec["blueprint"] is None:
                raise CheckpointError(f"checkpoint has seed tensors for slot {name} but no blueprint")
            else:
                same = slot.module is not None and (slot.seed_id, slot.blueprint) == (rec["seed_id"], rec["blueprint"])
                module = slot.module if same and slot.module is not None else self._make(rec["blueprint"], slot)
                try:
                    module.load_state_dict(seed_sd, strict=True)
                except RuntimeError as exc:
                    raise CheckpointError(f"seed tensors of slot {name} do not fit {rec['blueprint']}: {exc}") from exc
                slot.module = module
            slot.machine = StrictMachine(SEED, name, observer=slot.machine.observer, initial=rec["stage"],
                                         history=[TransitionRecord(**h) for h in rec["history"]])
            slot.blueprint = rec["blueprint"]
            slot.seed_id = rec["seed_id"]
            slot.germinations = rec["germinations"]
            slot.stats = SeedStats.from_dict(copy.deepcopy(rec["stats"]))
