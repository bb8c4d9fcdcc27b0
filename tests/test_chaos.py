"""Issue 26, item 8: a randomized fault campaign, torchft-style. Each case trains the same short growing job
twice: straight through, and with a real SIGKILL or SIGTERM to the `esper` process after a random number of
checkpoints, then resumed to the end. Both runs get the same catalogue fault at a random step. The final model,
optimizer and RNG must be bit-identical on CPU, and every seed must have walked the same lifecycle.

CI runs ``ESPER_CHAOS_N`` cases (3 unless set); ``ESPER_CHAOS_N=20 pytest tests/test_chaos.py`` runs more (the
README states the largest campaign run on the final code)."""

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
    esper,
    latest,
    out,
    sets,
    spawn,
    summary,
    tensors,
    train,
    wait_for,
)

from esper.core.config.faults import CATALOGUE

# one process, a fault the trainer survives (the run goes on to COMPLETED), firing in a growing job
FAULTS = ("nan_loss", "inf_grad", "loss_spike", "seed_forward_error", "checkpoint_write_error", "dataloader_error")
N = int(os.environ.get("ESPER_CHAOS_N", "3"))
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


@pytest.mark.slow
@pytest.mark.parametrize("case", range(N))
def test_an_interrupted_run_with_a_fault_resumes_to_exactly_the_straight_run(tmp_path: Path, case: int) -> None:
    rnd = random.Random(26_000 + case)
    fault, at = rnd.choice(FAULTS), f"{rnd.randrange(2, 4)}:{rnd.randrange(0, 6)}"
    kill_after, sig = rnd.randrange(1, 6), rnd.choice((signal.SIGKILL, signal.SIGTERM))
    assert CATALOGUE[fault].final_state == "COMPLETED"
    straight, broken, log = tmp_path / "straight", tmp_path / "broken", tmp_path / "log"
    r = train(straight, *JOB, extra=["--fault", f"{fault}@{at}"])
    assert r.exit_code == 0, out(r)
    proc = spawn(broken, *JOB, log=log, flags=["--fault", f"{fault}@{at}"])
    try:
        wait_for(lambda: _epochs_checkpointed(broken) >= kill_after, proc, log,
                 f"the checkpoint of epoch {kill_after} ({fault}@{at}, then {signal.Signals(sig).name})")
        proc.send_signal(sig)
        code = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code in (-signal.SIGKILL, 143, 0), log.read_text()  # 0: it finished before the signal landed
    # the same fault schedule: a fault whose step the interrupted session never reached fires in the resumed one,
    # and one it did reach fires again only if the resumed session replays that step (as the straight run's
    # rollback replayed it)
    r = esper("train", "--quiet", "--resume", str(broken), *sets(*JOB), "--fault", f"{fault}@{at}")
    assert r.exit_code == 0, out(r) + log.read_text()
    assert summary(broken)["status"] == "COMPLETED" and summary(broken)["epochs_completed"] == 7
    for stem in ("model", "optimizer", "rng"):
        assert_same_tensors(tensors(latest(straight), stem), tensors(latest(broken), stem))
    assert _lifecycle(broken) == _lifecycle(straight), (fault, at, kill_after, sig)
