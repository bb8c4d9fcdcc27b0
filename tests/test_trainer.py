"""Tolaria's training loop with Kasmina and Tamiyo wired in: commands, optimizer groups, NaN steps, determinism,
user plug-ins. Tiny synthetic runs only (each a second or two)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import WALL_CLOCK_FIELDS, EventRecorder, events, make_config, metrics
from typer.testing import CliRunner, Result

from esper.cli.main import app
from esper.core.config import EsperConfig
from esper.core.data import fetch
from esper.core.errors import ExitCode
from esper.core.records.rundir import RunDir
from esper.core.tamiyo import Command
from esper.core.tolaria.emergency import EmergencyManager
from esper.core.tolaria.train_state import EpochStats
from esper.core.tolaria.trainer import Trainer

FAST = [
    "data.task=synthetic", "data.synthetic_samples=128", "data.batch_size=32", "trainer.epochs=2",
    "controller.isolation=inline", "run.threads=1", "run.run_id=t", "seeds.blend.steps=3",
]
# val loss improves by well under 60% over two epochs on this task: the controller sees a plateau at epoch 3
PLATEAU = ["controller.plateau_min_delta=0.6", "controller.warmup_epochs=1", "controller.plateau_window=2"]

runner = CliRunner()


def make_cfg(*overrides: str) -> EsperConfig:
    return make_config(*overrides, base=FAST)


def run(tmp_path: Path, *overrides: str, name: str = "run") -> tuple[dict[str, Any], Path]:
    cfg = make_cfg(*overrides)
    rd = RunDir.create(cfg, tmp_path / name)
    summary = Trainer(cfg, rd).run()
    return summary, rd.path


class Stub:
    def __init__(self) -> None:
        self.applied_ids: list[str] = []
        self.aborted_ids: list[tuple[str, str]] = []

    def applied(self, cmd: Command) -> None:
        self.applied_ids.append(cmd.command_id)

    def aborted(self, cmd_id: str, reason: str) -> None:
        self.aborted_ids.append((cmd_id, reason))


@pytest.fixture
def built(tmp_path: Path) -> Iterator[tuple[Trainer, Stub, list[dict[str, Any]]]]:
    """A built trainer whose controller is a stub, so commands can be applied by hand; events are captured."""
    stub = Stub()
    cfg = make_cfg()
    rd = RunDir.create(cfg, tmp_path / "run")
    tr = Trainer(cfg, rd, controller_factory=lambda _cfg, _rid: stub)  # type: ignore[arg-type,return-value]
    seen: list[dict[str, Any]] = []
    tr.emitter.subscribe(seen.append)
    tr.build()
    yield tr, stub, seen
    tr.close()
    tr.emitter.close()


_seq = iter(range(1000))


def command(tr: Trainer, kind: str, slot: str, blueprint: str | None = None) -> Command:
    return Command(command_id=f"cmd-0001-{next(_seq):03d}", run_id=tr.run_id, epoch=1, kind=kind, slot=slot,
                   blueprint=blueprint, reason=f"test {kind}", reason_code="test",
                   issued_at=datetime.now(UTC).isoformat())


def group_of(tr: Trainer, p: torch.nn.Parameter) -> list[str]:
    return [g["name"] for g in tr.parts.optimizer.optimizer.param_groups if any(q is p for q in g["params"])]


def fake_evaluate(bypass: frozenset[str]) -> dict[str, float]:
    return {"val_loss": 1.5, "val_accuracy": 0.4} if bypass else {"val_loss": 1.0, "val_accuracy": 0.6}


def healthy_step(tr: Trainer) -> None:
    x, y = fetch(tr.parts.task.train, range(32))
    assert tr.train_step(x, y, EpochStats()) is True


# --- the controller, through the trainer ------------------------------------------------------------------


def test_controller_germinates_on_a_plateau(tmp_path: Path) -> None:
    summary, rd = run(tmp_path, "trainer.epochs=3", *PLATEAU)
    assert summary["status"] == "COMPLETED" and summary["exit_code"] == 0
    accepted = events(rd, "command.accepted")
    germinations = [e for e in accepted if e["attributes"]["command"]["kind"] == "germinate"]
    assert germinations, [e["attributes"] for e in events(rd, "command.rejected")]
    first = germinations[0]
    # warm-up 1 epoch and a 2-epoch window: epoch 3 is the first with a full plateau window
    assert first["epoch"] == 3
    assert first["attributes"]["reason"].startswith("plateau")
    cmd = first["attributes"]["command"]
    assert cmd["run_id"] == "t" and cmd["epoch"] == 3 and cmd["command_id"].startswith("cmd-0003-")
    slot = next(s for s in summary["seeds"] if s["slot"] == cmd["slot"])
    assert slot["stage"] == "TRAINING" and slot["blueprint"] == cmd["blueprint"]
    assert [h["dest"] for h in slot["history"]] == ["GERMINATED", "TRAINING"]
    gate_results = [e["attributes"] for e in events(rd, "gate.result") if e["attributes"]["slot"] == cmd["slot"]]
    assert [(g["gate"], g["passed"]) for g in gate_results] == [("G0", True), ("G1", True)]
    assert metrics(rd)[-1]["commands"]["accepted"] == 1


def test_no_germination_without_a_plateau(tmp_path: Path) -> None:
    summary, rd = run(tmp_path, "trainer.epochs=3", "controller.plateau_min_delta=0.0")
    assert summary["status"] == "COMPLETED"
    # the validation loss falls every epoch on this task, so nothing is below a 0% improvement threshold
    losses = [row["val_loss"] for row in metrics(rd)]
    assert losses[2] < losses[0]
    assert events(rd, "command.accepted") == []
    assert all(s["stage"] == "DORMANT" and s["history"] == [] for s in summary["seeds"])


def test_seeds_disabled_trains_the_host_alone(tmp_path: Path) -> None:
    summary, rd = run(tmp_path, "trainer.epochs=3", "seeds.enabled=false", *PLATEAU)
    assert summary["status"] == "COMPLETED" and summary["seeds"] == []
    assert events(rd, "command.accepted") == [] and events(rd, "seed.transition") == []


def test_illegal_command_applied_directly_is_rejected_with_an_event(
        built: tuple[Trainer, Stub, list[dict[str, Any]]]) -> None:
    tr, stub, seen = built
    groups = tr.parts.optimizer.optimizer.param_groups
    groups_before = [(g["name"], [id(p) for p in g["params"]]) for g in groups]
    cmd = command(tr, "fossilize", "s1")
    assert tr.parts.decisions.apply(cmd) is False
    slot = tr.parts.kasmina.slots["s1"]
    assert slot.stage == "DORMANT" and slot.module is None and slot.machine.history == []
    groups = tr.parts.optimizer.optimizer.param_groups
    assert [(g["name"], [id(p) for p in g["params"]]) for g in groups] == groups_before
    (rejected,) = [e for e in seen if e["event"] == "command.rejected"]
    attrs = rejected["attributes"]
    assert attrs["command"]["command_id"] == cmd.command_id and attrs["stage"] == "kasmina"
    assert "fossilize" in attrs["reason"] and "DORMANT" in attrs["reason"]
    assert [e for e in seen if e["event"] in ("command.accepted", "seed.transition")] == []
    assert stub.aborted_ids and stub.aborted_ids[0][0] == cmd.command_id and stub.applied_ids == []


def test_illegal_command_from_the_policy_is_rejected_by_the_validator(tmp_path: Path) -> None:
    summary, rd = run(tmp_path, "trainer.epochs=2", "controller.policy='plugins_fixture:fossilize_dormant'")
    assert summary["status"] == "COMPLETED", summary["failure"]
    rejected = events(rd, "command.rejected")
    assert len(rejected) == 2  # one per epoch
    for e in rejected:
        assert e["attributes"]["stage"] == "validator"
        assert e["attributes"]["command"]["kind"] == "fossilize" and e["attributes"]["command"]["slot"] == "s1"
        assert e["attributes"]["reason"]
    assert events(rd, "command.accepted") == [] and events(rd, "seed.transition") == []
    assert summary["seeds"][0]["stage"] == "DORMANT"
    assert summary["commands"] == {"rejected": 2}


@pytest.mark.parametrize("mode", ["convex", "residual", "channel", "confidence"])
def test_every_blend_mode_carries_a_seed_through_blending(tmp_path: Path, mode: str) -> None:
    vector = "[1.0, 0.5, 1.0, 0.5, 1.0, 0.5, 1.0, 0.5]"  # one entry per channel of the 8-wide hidden layers
    summary, rd = run(tmp_path, "trainer.epochs=7", *PLATEAU, "seeds.g2_min_improvement=0.0", "host.hidden=[8, 8]",
                      f"seeds.blend.mode='{mode}'", f"seeds.blend.channel_alpha={vector}")
    assert summary["status"] == "COMPLETED", summary["failure"]
    reached = {h["dest"] for s in summary["seeds"] for h in s["history"]}
    assert {"BLENDING", "SHADOWING"} <= reached
    assert all(r["val_loss"] == r["val_loss"] for r in metrics(rd))  # finite (not NaN) throughout


# --- optimizer groups follow the seed lifecycle -----------------------------------------------------------


def test_germinate_adds_a_seed_group_and_cull_removes_module_and_group(
        built: tuple[Trainer, Stub, list[dict[str, Any]]]) -> None:
    tr, stub, seen = built
    germ = command(tr, "germinate", "s1", "residual_mlp")
    assert tr.parts.decisions.apply(germ) is True
    slot = tr.parts.kasmina.slots["s1"]
    assert slot.stage == "TRAINING"
    seed_params = slot.params()
    assert seed_params and all(group_of(tr, p) == ["seed:s1"] for p in seed_params)
    healthy_step(tr)  # gives the seed group optimizer state, which must go with it

    cull = command(tr, "cull", "s1")
    assert tr.parts.decisions.apply(cull) is True
    assert slot.stage == "EMBARGOED" and slot.module is None
    assert [g["name"] for g in tr.parts.optimizer.optimizer.param_groups] == ["host"]
    assert all(group_of(tr, p) == [] for p in seed_params)
    assert all(id(p) not in {id(q) for q in tr.parts.optimizer.optimizer.state} for p in seed_params)
    assert stub.applied_ids == [germ.command_id, cull.command_id]
    accepted = [e["attributes"]["command"]["kind"] for e in seen if e["event"] == "command.accepted"]
    assert accepted == ["germinate", "cull"]
    # the host trains on without the seed
    healthy_step(tr)


def test_fossilized_params_join_the_host_group_with_their_state(
        built: tuple[Trainer, Stub, list[dict[str, Any]]]) -> None:
    tr, _, _ = built
    k = tr.parts.kasmina
    assert tr.parts.decisions.apply(command(tr, "germinate", "s2", "lowrank")) is True
    slot = k.slots["s2"]
    slot.stats.epoch_losses = [2.0]
    slot.stats.loss_sum, slot.stats.loss_count = 1.0, 1
    slot.stats.epochs_in_stage = tr.cfg.seeds.min_training_epochs - 1
    assert k.end_epoch(fake_evaluate) == [] and slot.stage == "BLENDING"
    for _ in range(tr.cfg.seeds.blend.steps):
        healthy_step(tr)  # blended: the seed learns through the task loss, so it has momentum state
    k.end_epoch(fake_evaluate)
    k.end_epoch(fake_evaluate)
    assert slot.stage == "PROBATIONARY"
    seed_params = slot.params()
    momentum = [tr.parts.optimizer.optimizer.state[p]["momentum_buffer"].clone() for p in seed_params]
    assert tr.parts.decisions.apply(command(tr, "fossilize", "s2")) is True
    assert slot.stage == "FOSSILIZED"
    assert [g["name"] for g in tr.parts.optimizer.optimizer.param_groups] == ["host"]
    assert all(group_of(tr, p) == ["host"] for p in seed_params)
    for p, m in zip(seed_params, momentum, strict=True):
        assert torch.equal(tr.parts.optimizer.optimizer.state[p]["momentum_buffer"], m)
    before = [p.detach().clone() for p in seed_params]
    healthy_step(tr)
    assert any(not torch.equal(b, p) for b, p in zip(before, seed_params, strict=True))  # still learning


# --- emergencies ------------------------------------------------------------------------------------------


def test_nan_loss_step_is_not_applied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Epoch 2, step 2 sees a batch with a NaN feature: the step is skipped, the level goes to ELEVATED."""
    original = Trainer.train_step
    calls = {"n": 0}
    checks: list[bool] = []
    snapshot: dict[str, torch.Tensor] = {}

    def state(tr: Trainer) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in tr.parts.optimizer.named_params()}

    def watch(tr: Trainer) -> Any:
        def on_event(record: dict[str, Any]) -> None:
            if record["event"] == "step.skipped":
                now = state(tr)
                checks.append(now.keys() == snapshot.keys() and all(torch.equal(now[k], snapshot[k]) for k in now))
        return on_event

    def train_step(self: Trainer, x: torch.Tensor, y: torch.Tensor, *args: Any, **kwargs: Any) -> bool:
        calls["n"] += 1
        if calls["n"] == 1:
            self.emitter.subscribe(watch(self))
        if calls["n"] == self.parts.steps_per_epoch + 2:
            x = x.clone()
            x[0, 0] = float("nan")
            snapshot.update(state(self))
            global_step = self.parts.state.global_step
            applied = original(self, x, y, *args, **kwargs)
            assert applied is False and self.parts.state.global_step == global_step
            return applied
        return original(self, x, y, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    summary, rd = run(tmp_path, "trainer.epochs=3")
    assert snapshot, "the NaN batch was never fed"
    assert checks == [True]  # exactly one skipped step, and the weights were untouched by it
    skipped = events(rd, "step.skipped")
    assert [e["attributes"]["cause"] for e in skipped] == ["non_finite_loss"]
    levels = events(rd, "emergency.level")
    transition = levels[0]["attributes"]["transition"]
    assert (transition["source"], transition["dest"]) == ("NOMINAL", "ELEVATED")
    assert levels[0]["level"] == "CRITICAL" and levels[0]["source"] == "tolaria"
    assert "non_finite_loss" in transition["reason"]
    assert summary["status"] == "COMPLETED", summary["failure"]
    assert summary["emergencies"][0]["dest"] == "ELEVATED"
    # nothing non-finite reached the model
    assert all(v is not None and v == v for row in metrics(rd) for v in (row["train_loss"], row["val_loss"]))


def test_loss_explosion_and_non_finite_detection_rules() -> None:
    em = EmergencyManager(make_cfg("emergency.loss_explosion_factor=10.0").emergency, EventRecorder())
    assert em.check_loss(1.0) is None
    em.accept_loss(1.0)
    assert em.check_loss(9.9) is None
    spike = em.check_loss(10.5)
    assert spike is not None and (spike.level, spike.cause) == ("ELEVATED", "loss_explosion")
    for bad in (float("nan"), float("inf"), float("-inf")):
        sig = em.check_loss(bad)
        assert sig is not None and (sig.level, sig.cause) == ("ELEVATED", "non_finite_loss")
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([0.0, float("inf"), 0.0])
    sig = EmergencyManager.check_grads([("w", p)])
    assert sig is not None and sig.cause == "non_finite_gradient" and sig.attributes["parameter"] == "w"
    p.grad = torch.zeros(3)
    assert EmergencyManager.check_grads([("w", p)]) is None


# --- determinism ------------------------------------------------------------------------------------------


def _comparable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k not in WALL_CLOCK_FIELDS} for row in rows]


def test_same_seed_gives_identical_metrics(tmp_path: Path) -> None:
    args = ("trainer.epochs=6", *PLATEAU)
    a, rd_a = run(tmp_path, *args, name="a")
    b, rd_b = run(tmp_path, *args, name="b")
    rows_a, rows_b = metrics(rd_a), metrics(rd_b)
    assert len(rows_a) == 6 and all("step_time_ms" in r for r in rows_a)
    assert _comparable(rows_a) == _comparable(rows_b)
    # seeds took part, so their init, training and blending are covered by the comparison
    assert any(r["seeds_by_stage"] != {"DORMANT": 2} for r in rows_a)
    assert [s["history"] and [h["dest"] for h in s["history"]] for s in a["seeds"]] == \
        [s["history"] and [h["dest"] for h in s["history"]] for s in b["seeds"]]
    c, rd_c = run(tmp_path, *args, "run.seed=7", name="c")
    assert _comparable(metrics(rd_c)) != _comparable(rows_a)


# --- user plug-ins through `esper train` ------------------------------------------------------------------


def train_cli(tmp_path: Path, *sets: str) -> Result:
    config = tmp_path / "esper.toml"
    config.write_text("")  # every key at its default; the test's --set values on top
    args = ["train", "--config", str(config), "--json", "--run-dir", str(tmp_path / "run")]
    for item in [*FAST, *sets]:
        args += ["--set", item]
    return runner.invoke(app, args)


def test_user_task_host_and_blueprint_plug_ins_work(tmp_path: Path) -> None:
    result = train_cli(tmp_path, "data.task=plugins_fixture:make_data", "host.factory=plugins_fixture:make_host",
                       "seeds.slots=[{name='s1', layer='trunk'}]",
                       "seeds.user_blueprints={scale='plugins_fixture:make_blueprint'}", "seeds.blueprints=['scale']",
                       "trainer.epochs=3", "controller.plateau_min_delta=0.9")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["status"] == "COMPLETED"
    (seed,) = summary["seeds"]
    assert seed["layer"] == "trunk" and seed["blueprint"] == "scale" and seed["stage"] == "TRAINING"
    rows = metrics(tmp_path / "run")
    host_params = 5 * 6 + 6 + 6 * 3 + 3  # TrunkHost on the plug-in task's 5 features and 3 classes
    assert rows[0]["params"] == host_params and rows[-1]["params"] == host_params + 6
    g0 = [e["attributes"] for e in events(tmp_path / "run", "gate.result") if e["attributes"]["gate"] == "G0"]
    assert g0 and g0[0]["passed"] and g0[0]["attributes"]["blueprint"] == "scale"


@pytest.mark.parametrize(("setting", "key", "needle"), [
    ("data.task=no_such_module_zz:make", "data.task", "no_such_module_zz"),
    ("data.task=plugins_fixture:not_a_dataset", "data.task", "dict"),
    ("data.task=plugins_fixture:missing_function", "data.task", "missing_function"),
    ("host.factory=no_such_module_zz:make", "host.factory", "no_such_module_zz"),
    ("host.factory=plugins_fixture:not_a_module", "host.factory", "str"),
    ("seeds.user_blueprints={bad='no_such_module_zz:make'}", "seeds.user_blueprints.bad", "no_such_module_zz"),
    ("seeds.user_blueprints={bad='plugins_fixture:not_a_blueprint'}", "seeds.user_blueprints.bad", "list"),
])
def test_broken_plug_in_is_exit_3_naming_the_key(tmp_path: Path, setting: str, key: str, needle: str) -> None:
    # the plateau setting makes the controller germinate the (only) blueprint if the run gets that far
    result = train_cli(tmp_path, setting, "seeds.blueprints=['bad']" if "bad=" in setting else "run.seed=42",
                       "trainer.epochs=3", "controller.plateau_min_delta=0.9")
    assert result.exit_code == ExitCode.CONFIG, result.output
    # refused before the run starts: the --json error document names the key, and no run directory is left
    doc = json.loads(result.stdout)
    assert doc["exit_code"] == ExitCode.CONFIG and doc["key"] == key
    assert key in doc["error"] and needle in doc["error"]
    assert not (tmp_path / "run").exists()
