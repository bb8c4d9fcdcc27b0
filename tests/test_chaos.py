"""Issue 26, item 8: a randomized fault campaign, torchft-style. Each case trains the same short growing job
twice, in a world of 1 or 2 processes: straight through, and interrupted, then resumed to the end. The
interruption is a real SIGKILL to the whole process group (a lost machine) or a SIGTERM to `esper` after a random
number of checkpoints, or a real SIGTERM at a random step (the catalogue's ``sigterm`` fault). Both runs get the
same catalogue fault at a random step; a third of the cases accumulate gradients over 4 batches, so a stop may
land inside a window. The final model, optimizer and RNG must be bit-identical on CPU (same world size), every
seed must have walked the same lifecycle, and the data position (global step, skipped batches) must be the
straight run's.

CI runs ``ESPER_CHAOS_N`` one-process cases (3 unless set) and ``ESPER_CHAOS_N2`` two-process ones (1 unless
set); ``ESPER_CHAOS_N=200 ESPER_CHAOS_N2=50 pytest tests/test_chaos.py`` runs more (the README states the largest
campaign run on the final code)."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    GROWING,
    assert_same_tensors,
    finish,
    latest,
    manifest,
    out,
    rank_env,
    spawn,
    spawn_resume,
    summary,
    tensors,
    train,
    wait_for,
)

# one process, a fault the trainer survives (the run goes on to COMPLETED), firing in a growing job
FAULTS = ("nan_loss", "inf_grad", "loss_spike", "seed_forward_error", "checkpoint_write_error", "dataloader_error")
N = int(os.environ.get("ESPER_CHAOS_N", "3"))
N2 = int(os.environ.get("ESPER_CHAOS_N2", "1"))
JOB = [*GROWING, "trainer.epochs=7", "seeds.blend.steps=4"]  # 6 steps an epoch; seeds live from epoch 2 on


def _epochs_checkpointed(run: Path) -> int:
    """The epoch of the newest checkpoint ``latest`` names (0 before the first); older ones are pruned."""
    pointer = run / "checkpoints" / "latest"
    try:
        name = pointer.read_text().strip()
    except FileNotFoundError:
        return 0
    return int(name.split("-")[1]) if name.startswith("epoch-") else 0


def _lifecycle(run: Path) -> list[tuple[Any, ...]]:
    return [(s["slot"], s["stage"], s["blueprint"], tuple(h["dest"] for h in s["history"]))
            for s in summary(run)["seeds"]]


def _data_position(run: Path) -> tuple[Any, ...]:
    last = manifest(latest(run))
    return last["epoch"], last["step_in_epoch"], last["global_step"], last["data"]


CASES = [(1, case) for case in range(N)] + [(2, case) for case in range(N2)]


@pytest.mark.slow
@pytest.mark.parametrize(("world", "case"), CASES, ids=[f"world{w}-{c}" for w, c in CASES])
def test_an_interrupted_run_with_a_fault_resumes_to_exactly_the_straight_run(tmp_path: Path, world: int,
                                                                             case: int) -> None:
    rnd = random.Random(26_000 + 1_000 * (world - 1) + case)
    fault, at = rnd.choice(FAULTS), f"{rnd.randrange(2, 4)}:{rnd.randrange(0, 6)}"
    how, kill_after = rnd.choice(("sigkill", "sigterm", "sigterm_at_step")), rnd.randrange(1, 6)
    stop_at = f"{rnd.randrange(2, 7)}:{rnd.randrange(0, 6)}"
    accumulate = rnd.choice((1, 1, 4))
    job = [*JOB, f"trainer.accumulate_steps={accumulate}"]
    nproc = ["--nproc", "2"] if world == 2 else []
    what = (world, fault, at, how, stop_at if how == "sigterm_at_step" else kill_after, accumulate)
    straight, broken, log = tmp_path / "straight", tmp_path / "broken", tmp_path / "log"
    flags = [*nproc, "--fault", f"{fault}@{at}"]
    if world == 1:
        r = train(straight, *job, extra=flags)
        assert r.exit_code == 0, out(r)
    else:
        proc = spawn(straight, *job, log=log, flags=flags, env=rank_env())
        assert finish(proc, log) == 0, log.read_text()
    extra = ["--fault", f"sigterm@{stop_at}"] if how == "sigterm_at_step" else []
    proc = spawn(broken, *job, log=log, flags=[*flags, *extra], env=rank_env())
    try:
        if how == "sigterm_at_step":
            code = finish(proc, log)
        else:
            wait_for(lambda: _epochs_checkpointed(broken) >= kill_after, proc, log, f"the checkpoint of {what}")
            if how == "sigkill":
                os.killpg(proc.pid, signal.SIGKILL)  # every process of the session: the machine is lost
            else:
                proc.send_signal(signal.SIGTERM)
            code = proc.wait(120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert code in (-signal.SIGKILL, 143, 0), log.read_text()  # 0: it finished before the signal landed
    # the same fault schedule: a fault whose step the interrupted session never reached fires in the resumed one,
    # and one it did reach fires again only if the resumed session replays that step (as the straight run's
    # rollback replayed it)
    proc = spawn_resume(broken, *job, log=log, flags=flags, env=rank_env())
    assert finish(proc, log) == 0, log.read_text()
    assert summary(broken)["status"] == "COMPLETED" and summary(broken)["epochs_completed"] == 7, what
    for stem in ("model", "optimizer", "rng"):
        assert_same_tensors(tensors(latest(straight), stem), tensors(latest(broken), stem))
    assert _lifecycle(broken) == _lifecycle(straight), what
    assert _data_position(broken) == _data_position(straight), what
