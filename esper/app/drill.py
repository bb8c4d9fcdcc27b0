"""Emergency drills (E-2): a short real run with one injected fault or forced level, checked against the
catalogue's expected outcome."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from esper.app.session import TrainSession
from esper.app.views.read import read_summary
from esper.core.checkpoint import latest_checkpoint, verify_checkpoint
from esper.core.config import EsperConfig, from_dict
from esper.core.config.faults import CATALOGUE, MULTI_RANK, FaultSpec, parse_at, unknown_fault
from esper.core.dist.launcher import run_ranks
from esper.core.errors import ConfigError, ExpectationFailed, UsageError
from esper.core.records.event_log import read_events
from esper.core.records.rundir import RunDir
from esper.core.tolaria import LEVELS, force_level

# A short run in which every fault has something to act on: a seed germinates at the first epoch end (so seed
# faults find a live seed), checkpoints every epoch. Applied on top of the config file whichever model is drilled.
DRILL_RUN: dict[str, Any] = {
    "trainer": {"epochs": 6},
    "controller": {"warmup_epochs": 0, "plateau_window": 1, "plateau_min_delta": 1.0, "timeout_ms": 1500},
    "seeds": {"min_training_epochs": 1, "g2_min_improvement": 0.0},
    "emergency": {"recovery_epochs": 2},
}

# Where each fault fires unless --at says otherwise: seed faults after the first germination (epoch 2 end),
# checkpoint faults before the last epoch so their detection and recovery are inside the run.
DEFAULT_AT = {"sigterm": "3:2", "rank_crash": "3:1", "seed_forward_error": "3:1", "checkpoint_corrupt": "3:0",
              "checkpoint_write_error": "3:0"}

FORCED = {  # what a forced level must lead to
    "NOTICE": FaultSpec("force:NOTICE", "level forced to NOTICE", "NOTICE", "event only", "COMPLETED", 0),
    "ELEVATED": FaultSpec("force:ELEVATED", "level forced to ELEVATED", "ELEVATED", "fast rollback",
                          "COMPLETED", 0),
    "CONSERVATIVE": FaultSpec("force:CONSERVATIVE", "level forced to CONSERVATIVE", "CONSERVATIVE",
                              "trainer paused until recovery", "COMPLETED", 0),
    "HALT": FaultSpec("force:HALT", "level forced to HALT", "HALT",
                      "emergency checkpoint of last-known-good; halted", "HALTED", 6),
}


# --synthetic: the drill's own small job (a few seconds whatever the config trains): the synthetic task on the
# built-in mlp host with its built-in slots and feature blueprints (the schema's defaults).
SYNTHETIC_JOB = {"data": ("batch_size", "eval_batch_size", "drop_last", "val_fraction", "synthetic_features",
                          "synthetic_classes"),
                 "host": ("factory", "hidden", "activation", "output", "dropout"),
                 "seeds": ("blueprints", "slots", "blend", "param_budget")}
SYNTHETIC_DATA = {"task": "synthetic", "synthetic_samples": 256}


def drill_config(base: EsperConfig, overrides: list[str], *, synthetic: bool = False) -> EsperConfig:
    """The drill's config: the config file (its model and task, or the small synthetic job when ``synthetic``),
    then the drill's short-run settings, then the user's ``--set``."""
    merged = base.to_dict()
    if synthetic:
        defaults = EsperConfig().to_dict()
        for section, keys in SYNTHETIC_JOB.items():
            merged[section].update({k: defaults[section][k] for k in keys})
        merged["data"].update(SYNTHETIC_DATA)
    for section, values in DRILL_RUN.items():
        merged[section].update(values)
    return from_dict(merged, overrides)


def drilled_model(cfg: EsperConfig, *, synthetic: bool) -> dict[str, Any]:
    """What the drill trains, for its report: an operator must see whether their own model was drilled."""
    return {"host": cfg.host.factory, "task": cfg.data.task, "slots": [s.layer for s in cfg.seeds.slots],
            "source": "synthetic" if synthetic else "config"}


def run_drill(cfg: EsperConfig, *, fault: str | None, level: str | None, at: str | None,
              run_dir: Path | None, synthetic: bool = False) -> dict[str, Any]:
    """Run the drill and build its report (see ``esper simulate-emergency --json``)."""
    point = check_drill(fault=fault, level=level, at=at)
    if fault == "controller_timeout" and cfg.controller.isolation != "process":
        raise ConfigError("controller_timeout needs controller.isolation = 'process' (an inline decision cannot "
                          "be abandoned)", key="controller.isolation")
    expected = CATALOGUE[fault] if fault else FORCED[level.upper()]  # type: ignore[union-attr]
    faults = [{"name": fault, "at": point}] if fault else []
    cfg = from_dict({**cfg.to_dict(), "faults": [*cfg.to_dict()["faults"], *faults]})
    path = run_dir if run_dir is not None else Path(tempfile.mkdtemp(prefix="esper-drill-"))
    if fault in MULTI_RANK:
        doc = _ranks_drill(cfg, fault, point, path, expected)
    else:
        # a forced level is one more fault entry (not a config key: a resume from the drill's checkpoint is clean)
        session = TrainSession.prepare(cfg, run_dir=path, injected=[force_level(level, point)] if level else [])
        summary = session.run(reporter=None)
        doc = report(summary, session.run_dir, expected, fault=fault, level=level, at=point)
    return {"model": drilled_model(cfg, synthetic=synthetic), **doc}


def _ranks_drill(cfg: EsperConfig, fault: str, at: str, path: Path, expected: FaultSpec) -> dict[str, Any]:
    """A fault of a world of several ranks: the same drill run as ``esper train --nproc 2 --max-restarts 1``
    (the launcher's workers write their output to log files beside the config, never to this command's
    stdout), checked from rank 0's summary and events."""
    work = Path(tempfile.mkdtemp(prefix="esper-drill-ranks-"))
    (work / "drill.toml").write_text(cfg.to_toml())
    code = run_ranks(2, 1, ["--config", str(work / "drill.toml"), "train", "--quiet", "--run-dir", str(path)],
                     log_dir=work / "logs")
    summary, problems = read_summary(path)
    if summary is None:
        raise ExpectationFailed(f"the drill's 2 ranks ended with exit {code} and no usable summary.json "
                                f"({'; '.join(problems) or 'none written'}); their logs: {work / 'logs'}")
    doc = report(summary, RunDir(path, str(summary.get("run_id"))), expected, fault=fault, level=None, at=at)
    if code != summary["exit_code"]:
        doc["mismatches"].append(f"the group exited {code}, its summary says {summary['exit_code']}")
        doc["matched"] = False
    return doc


def check_drill(*, fault: str | None, level: str | None, at: str | None) -> str:
    """The drill's options as the command line gave them; a bad one is a usage error (exit 2). Returns where the
    fault fires."""
    if (fault is None) == (level is None):
        raise UsageError("give exactly one of --fault NAME or --level LEVEL", key="--fault")
    if fault is not None and fault not in CATALOGUE:
        raise UsageError(f"--fault: {unknown_fault(fault)}", key="--fault")
    if level is not None and level.upper() not in FORCED:
        raise UsageError(f"--level: unknown level {level[:40]!r}; levels: "
                         f"{', '.join(x.lower() for x in LEVELS[1:])}", key="--level")
    point = at or DEFAULT_AT.get(fault or "", "2:1")
    try:
        parse_at(point)
    except ValueError as exc:
        raise UsageError(f"--at {point[:40]!r}: {exc}", key="--at") from None
    return point


def report(summary: dict[str, Any], rd: RunDir, expected: FaultSpec, *, fault: str | None, level: str | None,
           at: str) -> dict[str, Any]:
    events = read_events(rd.events).records
    fired = [e for e in events if e["event"] == "fault.injected"]
    detected = None
    start = fired[0]["seq"] if fired else None
    for e in events:
        if start is None or e["seq"] < start:
            continue  # a detection is the fault's only if it comes after the fault fired
        if e["event"] in ("emergency.level", "emergency.signal", "stop.requested") or (
                e["event"] == "fault.injected" and expected.level == "NOMINAL"):
            detected = {"epoch": e["epoch"], "global_step": e["step"], "event": e["event"]}
            break
    reached = max((LEVELS.index(h["dest"]) for h in summary["emergencies"] if h["trigger"].startswith("raise_")),
                  default=0)
    level_reached = LEVELS[reached]
    actions = _actions(events)
    rollback = summary["rollbacks"][0] if summary["rollbacks"] else None
    ckpt = latest_checkpoint(rd.checkpoints)
    verified = verify_checkpoint(ckpt).ok if ckpt is not None else False
    mismatches = []
    if not fired:
        mismatches.append("the fault never fired (is --at past the end of the run?)")
    if level_reached != expected.level:
        mismatches.append(f"level reached {level_reached}, expected {expected.level}")
    if summary["status"] != expected.final_state:
        mismatches.append(f"final state {summary['status']}, expected {expected.final_state}")
    if summary["exit_code"] != expected.exit_code:
        mismatches.append(f"exit code {summary['exit_code']}, expected {expected.exit_code}")
    if not verified:
        mismatches.append("the last checkpoint does not verify")
    if rollback is not None and not rollback["within_sla"]:
        mismatches.append(f"rollback took {rollback['latency_ms']:.1f} ms > SLA {rollback['sla_ms']} ms")
    if "rollback" in expected.action and rollback is None:
        mismatches.append("expected a rollback, none happened")
    if "restarts the group" in expected.action and "group_restarted" not in actions:
        mismatches.append("expected the group to be restarted (run.restarted), it was not")
    if "skipped" in expected.action and "batch_skipped" not in actions:
        mismatches.append("expected the offending batch to be skipped on the replay, it was not")
    return {
        "fault": fault,
        "level_forced": level.upper() if level else None,
        "at": at,
        "run_dir": str(rd.path),
        "detected": detected,
        "level_reached": level_reached,
        "actions": actions,
        "rollback": None if rollback is None else {
            k: rollback[k] for k in ("tier", "latency_ms", "sla_ms", "within_sla", "deadline_missed_at_ms", "path",
                                     "fell_through")},
        "rollbacks": len(summary["rollbacks"]),
        "final_state": summary["status"],
        "exit_code": summary["exit_code"],
        "checkpoint": {"path": str(ckpt) if ckpt else None, "verified": verified},
        "expected": expected.to_dict(),
        "matched": not mismatches,
        "mismatches": mismatches,
        "summary": {k: summary[k] for k in ("run_id", "epochs_completed", "final", "failure")},
    }


_ACTION_EVENTS = {
    "rollback.completed": "rollback", "rollback.failed": "rollback_failed", "seed.transition": None,
    "controller.suspended": "controller_suspended", "checkpoint.failed": "checkpoint_write_failed",
    "checkpoint.corrupt_detected": "corruption_detected", "command.rejected": "command_rejected",
    "stop.requested": "graceful_stop", "batch.skipped": "batch_skipped", "run.restarted": "group_restarted",
}


def _actions(events: list[dict[str, Any]]) -> list[str]:
    seen: list[str] = []
    after_fault = False
    for e in events:
        if e["event"] == "fault.injected":
            after_fault = True
        if not after_fault:
            continue
        name = _ACTION_EVENTS.get(e["event"])
        if e["event"] == "seed.transition" and e["attributes"].get("transition", {}).get("dest") == "CULLED":
            name = "seed_culled"
        if e["event"] == "trainer.transition":
            dest = e["attributes"]["transition"]["dest"]
            name = {"PAUSED": "trainer_paused", "HALTED": "halted", "STOPPED": "stopped"}.get(dest)
            if dest == "CHECKPOINTING" and "emergency" in e["attributes"]["transition"]["reason"]:
                name = "emergency_checkpoint"
        if e["event"] == "emergency.level" and e["attributes"].get("transition", {}).get("trigger") == "clear":
            name = "downgraded"
        if name and name not in seen:
            seen.append(name)
    return seen
