"""The fault catalogue of SPEC §6 E-1: what each fault does and what the system must do about it.

How each fault is injected (the hook it acts through) is ``esper.core.tolaria.injector``.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import asdict, dataclass


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
                  "fast rollback; bad step not applied; its batch skipped on the replay", "COMPLETED", 0),
        FaultSpec("inf_grad", "one parameter gradient becomes +inf after backward", "ELEVATED",
                  "fast rollback; bad step not applied", "COMPLETED", 0),
        FaultSpec("loss_spike", "one step's loss is multiplied far past the EWMA explosion factor", "ELEVATED",
                  "fast rollback; bad step not applied; its batch skipped on the replay", "COMPLETED", 0),
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
        FaultSpec("rank_crash", "rank 1 of 2 or more is SIGKILLed (first attempt of the group only; needs "
                  "--nproc >= 2 and --max-restarts >= 1)", "NOMINAL",
                  "the elastic agent restarts the group, which resumes from latest (run.restarted)", "COMPLETED", 0),
    )
}

CRASHED_RANK = 1  # the rank rank_crash kills (rank 0 is the run's writer: its loss is the same restart)
MULTI_RANK = frozenset({"rank_crash"})  # faults that only mean something in a world of 2 or more ranks


def unknown_fault(name: str) -> str:
    """One line for a name the catalogue does not have, with the closest name when there is one."""
    close = difflib.get_close_matches(name, list(CATALOGUE), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown fault {name[:60]!r}{hint} (see `esper faults list`)"


_AT = re.compile(r"^(\d{1,9})(?::(\d{1,9}))?$")


def parse_at(text: str) -> tuple[int, int]:
    """Parse ``EPOCH[:STEP]`` (1-based epoch, 0-based step within the epoch); raise ValueError."""
    m = _AT.match(text.strip())
    if not m:
        raise ValueError(f"expected EPOCH[:STEP] like '2:5', got {text[:40]!r}")
    epoch, step = int(m.group(1)), int(m.group(2) or 0)
    if epoch < 1:
        raise ValueError(f"epochs count from 1, got {epoch}")
    return epoch, step
