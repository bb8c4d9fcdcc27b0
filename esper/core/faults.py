"""The fault catalogue of SPEC §6 E-1: what each fault does and what the system must do about it."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class FaultSpec:
    """One catalogue entry: the fault and the outcome a drill must observe."""

    name: str
    description: str
    level: str  # highest emergency level the run must reach
    action: str  # recovery action taken
    final_state: str  # trainer state at the end of the drill
    exit_code: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


CATALOGUE: dict[str, FaultSpec] = {
    f.name: f
    for f in (
        FaultSpec("nan_loss", "the training loss of one step becomes NaN", "ELEVATED",
                  "fast rollback; bad step not applied", "COMPLETED", 0),
        FaultSpec("inf_grad", "one parameter gradient becomes +inf after backward", "ELEVATED",
                  "fast rollback; bad step not applied", "COMPLETED", 0),
        FaultSpec("loss_spike", "one step's loss is multiplied far past the EWMA explosion factor", "ELEVATED",
                  "fast rollback; bad step not applied", "COMPLETED", 0),
        FaultSpec("seed_forward_error", "an active seed's forward raises", "ELEVATED",
                  "fast rollback; offending seed culled", "COMPLETED", 0),
        FaultSpec("controller_timeout", "the controller's decision hangs past controller.timeout_ms",
                  "CONSERVATIVE", "decision abandoned; trainer paused until recovery", "COMPLETED", 0),
        FaultSpec("controller_crash", "the controller's decision raises", "CONSERVATIVE",
                  "trainer paused until recovery", "COMPLETED", 0),
        FaultSpec("illegal_command", "the controller issues a command the seed lifecycle forbids", "NOTICE",
                  "command rejected with its reason; nothing changes", "COMPLETED", 0),
        FaultSpec("slow_step", "one optimizer step sleeps past emergency.slow_step_ms", "NOTICE",
                  "event only", "COMPLETED", 0),
        FaultSpec("checkpoint_write_error", "one checkpoint write fails with an OSError", "NOTICE",
                  "previous checkpoint kept; next write retried", "COMPLETED", 0),
        FaultSpec("checkpoint_corrupt", "a byte of the newest checkpoint flips after it is written", "NOTICE",
                  "corruption detected on verification; checkpoint rewritten", "COMPLETED", 0),
        FaultSpec("dataloader_error", "the training data loader raises mid-epoch", "ELEVATED",
                  "fast rollback; epoch retried", "COMPLETED", 0),
        FaultSpec("sigterm", "the process receives a real SIGTERM", "NOMINAL",
                  "graceful checkpoint, then stop", "STOPPED", 143),
    )
}

_AT = re.compile(r"^(\d+)(?::(\d+))?$")


def parse_at(text: str) -> tuple[int, int]:
    """Parse ``EPOCH[:STEP]`` (1-based epoch, 0-based step within the epoch); raise ValueError."""
    m = _AT.match(text.strip())
    if not m:
        raise ValueError(f"expected EPOCH[:STEP] like '2:5', got {text!r}")
    epoch, step = int(m.group(1)), int(m.group(2) or 0)
    if epoch < 1:
        raise ValueError(f"epochs count from 1, got {epoch}")
    return epoch, step


# Faults that act inside one training step, at the step they are declared for.
STEP_FAULTS = frozenset({"nan_loss", "inf_grad", "loss_spike", "seed_forward_error", "slow_step",
                         "dataloader_error", "sigterm"})
# Faults that arm at their point and act at the next place they can: a decision or a checkpoint write.
ARMED_FAULTS = frozenset({"controller_timeout", "controller_crash", "illegal_command", "checkpoint_write_error",
                          "checkpoint_corrupt"})
FORCE_LEVEL = "force_level"
if set(CATALOGUE) != STEP_FAULTS | ARMED_FAULTS:  # checked at import: every catalogue fault can be injected
    raise RuntimeError(f"faults without an injection point: {set(CATALOGUE) ^ (STEP_FAULTS | ARMED_FAULTS)}")


class FaultInjector:
    """Fires each configured fault once at its ``EPOCH:STEP``; armed faults wait for their injection point."""

    def __init__(self, faults: list[tuple[str, str]], emit: Callable[..., Any],
                 forced_level: tuple[str, str] | None = None) -> None:
        self.emit = emit
        self.pending: list[tuple[tuple[int, int], str]] = [(parse_at(at), name) for name, at in faults]
        self.forced_level = forced_level[0] if forced_level else None
        if forced_level is not None:
            self.pending.append((parse_at(forced_level[1]), FORCE_LEVEL))
        self.armed: set[str] = set()
        self.fired: list[dict[str, Any]] = []

    def at_step(self, epoch: int, step: int, global_step: int) -> set[str]:
        """Faults due at this step (step faults to act on now; armed ones are kept for ``take``)."""
        due = {name for (e, s), name in self.pending if (e, s) == (epoch, step)}
        if not due:
            return set()
        self.pending = [(at, name) for at, name in self.pending if name not in due or at != (epoch, step)]
        for name in sorted(due):
            record = {"fault": name, "epoch": epoch, "step": step, "global_step": global_step}
            if name == FORCE_LEVEL:
                record["forced_level"] = self.forced_level
            self.fired.append(record)
            self.emit("tolaria", "fault.injected", "WARNING", **record)
        self.armed |= due & ARMED_FAULTS
        return due - ARMED_FAULTS

    def take(self, name: str) -> bool:
        """Consume an armed fault at its injection point."""
        if name in self.armed:
            self.armed.discard(name)
            return True
        return False
