"""The TRAINING seed's own pass from the cached slot input equals the full substituted forward, bit for bit."""

from __future__ import annotations

from pathlib import Path

import torch

from esper.core import config as cfgmod
from esper.core.records.rundir import RunDir
from esper.core.tolaria.trainer import Trainer


def _grads(slots: list) -> list[torch.Tensor]:
    return [p.grad.clone() for s in slots for p in s.params()]


def test_suffix_seed_pass_is_bit_identical_to_the_full_pass_with_two_training_seeds(tmp_path: Path) -> None:
    cfg = cfgmod.from_dict({}, ["data.task=synthetic", "data.synthetic_samples=128",
                                "controller.isolation=inline"])
    tr = Trainer(cfg, RunDir.create(cfg, tmp_path / "run"))
    tr.build()
    task_loss = tr.parts.task.loss
    try:
        for name in ("s1", "s2"):  # s2 sits downstream of s1: s1's pass runs s2's hook
            tr.parts.kasmina.germinate(name, "residual_mlp", "test")
            tr.parts.optimizer.rebuild("germinated")
            result = tr.parts.kasmina.probe_g1(name, *tr.parts.probe, task_loss)
            tr.parts.kasmina.start_training(name, result, "test")
            for p in tr.parts.kasmina.slots[name].params():  # non-zero everywhere, so any difference shows
                torch.nn.init.normal_(p)
        slots = [tr.parts.kasmina.slots["s1"], tr.parts.kasmina.slots["s2"]]
        x, y = tr.parts.probe
        tr.parts.kasmina.forward(x)
        tr.parts.kasmina.seed_passes(slots, x, y, task_loss)
        suffix = _grads(slots)
        for s in slots:
            for p in s.params():
                p.grad = None
        for s in slots:
            tr.parts.kasmina.seed_pass(s, x, y, task_loss)  # no cached input: the full substituted forward
        full = _grads(slots)
        assert len(suffix) == len(full) > 0
        assert all(torch.equal(a, b) for a, b in zip(suffix, full, strict=True))
        assert any(float(g.abs().sum()) > 0 for g in suffix)
    finally:
        tr.close()
