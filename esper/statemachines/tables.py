"""The three lifecycles of SPEC §3, as data. Everything else is derived from these tables."""

from __future__ import annotations

from esper.statemachines.table import Edge, LifecycleTable

_SEED_ACTIVE = ("GERMINATED", "TRAINING", "BLENDING", "SHADOWING", "PROBATIONARY")

SEED = LifecycleTable(
    name="seed",
    states=(
        ("DORMANT", 1, "empty slot, no module"),
        ("GERMINATED", 2, "blueprint instantiated and attached, not yet trained"),
        ("TRAINING", 3, "trains on detached host activations; output computed, not added"),
        ("BLENDING", 4, "output blended in, alpha ramps 0 -> 1"),
        ("SHADOWING", 5, "alpha = 1; contribution watched for stability"),
        ("PROBATIONARY", 6, "alpha = 1; contribution measured against the host without it"),
        ("FOSSILIZED", 7, "permanent part of the host"),
        ("CULLED", 8, "removed from the forward pass and the optimizer"),
        ("EMBARGOED", 9, "slot cools down before reuse"),
        ("RESETTING", 10, "slot state being cleared"),
        ("TERMINATED", 11, "slot retired"),
    ),
    initial="DORMANT",
    terminal=frozenset({"TERMINATED"}),
    edges=(
        Edge("germinate", ("DORMANT",), "GERMINATED", gate="G0"),
        Edge("start_training", ("GERMINATED",), "TRAINING", gate="G1"),
        Edge("start_blending", ("TRAINING",), "BLENDING", gate="G2"),
        Edge("start_shadowing", ("BLENDING",), "SHADOWING", gate="G3"),
        Edge("start_probation", ("SHADOWING",), "PROBATIONARY"),
        Edge("fossilize", ("PROBATIONARY",), "FOSSILIZED", gate="G4"),
        Edge("cull", _SEED_ACTIVE, "CULLED", note="reason required"),
        Edge("embargo", ("CULLED",), "EMBARGOED"),
        Edge("reset", ("EMBARGOED",), "RESETTING", note="after the embargo expires"),
        Edge("reactivate", ("RESETTING",), "DORMANT", gate="G5"),
        Edge("terminate", ("DORMANT", "FOSSILIZED"), "TERMINATED"),
    ),
)

_TRAINER_RUNNING = ("TRAINING", "VALIDATING", "CHECKPOINTING", "PAUSED", "ROLLING_BACK")

TRAINER = LifecycleTable(
    name="trainer",
    states=(
        ("INITIALIZING", 1, "building data, host, seeds and optimizer"),
        ("READY", 2, "built (or restored from a checkpoint), not yet stepping"),
        ("TRAINING", 3, "running optimizer steps"),
        ("VALIDATING", 4, "evaluating the held-out split"),
        ("CHECKPOINTING", 5, "writing a verified checkpoint"),
        ("PAUSED", 6, "conservative mode: host trains, no lifecycle mutations"),
        ("ROLLING_BACK", 7, "restoring last-known-good state"),
        ("STOPPED", 8, "operator interrupt after a graceful checkpoint"),
        ("HALTED", 9, "stopped by an emergency HALT"),
        ("COMPLETED", 10, "all epochs done"),
        ("FAILED", 11, "unexpected error, recorded"),
    ),
    initial="INITIALIZING",
    terminal=frozenset({"STOPPED", "HALTED", "COMPLETED", "FAILED"}),
    edges=(
        Edge("ready", ("INITIALIZING",), "READY"),
        Edge("train", ("READY", "VALIDATING", "CHECKPOINTING", "ROLLING_BACK", "PAUSED"), "TRAINING"),
        Edge("pause", ("READY", "TRAINING", "VALIDATING", "CHECKPOINTING", "ROLLING_BACK"), "PAUSED"),
        Edge("validate", ("TRAINING", "PAUSED"), "VALIDATING"),
        Edge("checkpoint", ("READY", "TRAINING", "VALIDATING", "PAUSED", "ROLLING_BACK"), "CHECKPOINTING"),
        Edge("rollback", ("TRAINING", "VALIDATING", "PAUSED", "CHECKPOINTING"), "ROLLING_BACK"),
        Edge("complete", ("READY", "VALIDATING", "CHECKPOINTING"), "COMPLETED",
             note="from READY: resumed with no epochs left"),
        Edge("stop", ("CHECKPOINTING",), "STOPPED", note="after the graceful checkpoint"),
        Edge("halt", ("READY", *_TRAINER_RUNNING), "HALTED"),
        Edge("fail", ("INITIALIZING", "READY", *_TRAINER_RUNNING), "FAILED"),
    ),
)

EMERGENCY = LifecycleTable(
    name="emergency",
    states=(
        ("NOMINAL", 0, "healthy"),
        ("NOTICE", 1, "event only"),
        ("ELEVATED", 2, "fast rollback; offending seed culled; bad step not applied"),
        ("CONSERVATIVE", 3, "trainer paused: controller suspended, seeds frozen, host trains"),
        ("HALT", 4, "emergency checkpoint, trainer halted, exit 6"),
    ),
    initial="NOMINAL",
    terminal=frozenset({"HALT"}),
    edges=(
        Edge("raise_notice", ("NOMINAL",), "NOTICE"),
        Edge("raise_elevated", ("NOMINAL", "NOTICE"), "ELEVATED"),
        Edge("raise_conservative", ("NOMINAL", "NOTICE", "ELEVATED"), "CONSERVATIVE"),
        Edge("raise_halt", ("NOMINAL", "NOTICE", "ELEVATED", "CONSERVATIVE"), "HALT"),
        Edge("downgrade", ("NOTICE",), "NOMINAL", note="explicit, with a reason"),
        Edge("downgrade", ("ELEVATED",), "NOTICE", note="explicit, with a reason"),
        Edge("downgrade", ("CONSERVATIVE",), "ELEVATED", note="explicit, with a reason"),
        Edge("clear", ("NOTICE", "ELEVATED", "CONSERVATIVE"), "NOMINAL", note="explicit, with a reason"),
    ),
)

TABLES: dict[str, LifecycleTable] = {t.name: t for t in (SEED, TRAINER, EMERGENCY)}

SeedStage = SEED.enum
TrainerState = TRAINER.enum
EmergencyLevel = EMERGENCY.enum

# Derived from the tables, never restated: the stages that hold a live (cullable) seed, and the trigger that
# raises the emergency level to each level.
SEED_LIVE: frozenset[str] = frozenset(next(e.sources for e in SEED.edges if e.trigger == "cull"))
ESCALATE_TRIGGER: dict[str, str] = {e.dest: e.trigger for e in EMERGENCY.edges if e.trigger.startswith("raise_")}
