"""P-1L: Esper's train step against the same model, data and seeds' math run by a PyTorch Lightning ``Trainer``
(``lightning_peer``). Lightning is the optional ``bench`` extra: without it the row is skipped, with the reason."""

from __future__ import annotations

import importlib
import importlib.util

from esper.app.bench.p1 import P1Setup, esper_round, plain_side
from esper.app.bench.stats import BenchPlan, Comparison, Skipped, alternate, gc_paused

NAME = "train step vs a Lightning Trainer, same modules"


def lightning_missing() -> str | None:
    """Why P-1L cannot run here, or None when the ``lightning`` package is installed."""
    if importlib.util.find_spec("lightning") is None:
        return "the lightning package is not installed (the bench extra: pip install -e \".[bench]\")"
    return None


def run_p1l(s: P1Setup, plan: BenchPlan) -> Comparison | Skipped:
    """Lightning's step (the baseline) against ``train_step`` on the P-1 set-up, from the trainer's state."""
    missing = lightning_missing()
    if missing is not None:
        return Skipped("P-1L", NAME, missing)
    peer = importlib.import_module("esper.app.bench.lightning_peer")  # imports lightning: only when installed
    module = peer.PeerModule(plain_side(s.cfg, s.parts))
    epochs = max(1, plan.p1_epochs_per_round // 2)  # half P-1's rounds: a Trainer per epoch, the wall time
    with gc_paused():
        base, mine = alternate(lambda: peer.lightning_round(module, s.cfg.run.seed, s.epoch, epochs),
                               lambda: esper_round(s, epochs), warmup=plan.warmup, repeats=plan.repeats)
    return Comparison("P-1L", NAME, "ms/step", "lightning.Trainer (barebones, cpu), manual optimization",
                      "Trainer.train_step", base, mine, None,
                      size={"params": s.parts.kasmina.total_params(), "batch_size": s.cfg.data.batch_size,
                            "steps_per_round": s.parts.steps_per_epoch * epochs},
                      extra={"lightning": peer.VERSION})
