"""The TRAINING seed's own pass from the cached slot input equals the full substituted forward, bit for bit."""

from __future__ import annotations

from pathlib import Path

import torch

from esper.core import config as cfgmod
from esper.core.rundir import RunDir
from esper.core.tolaria.trainer import Trainer, _loss


def _grads(slots: list) -> list[torch.Tensor]:
    return [p.grad.clone() for s in slots for p in s.params()]


def test_suffix_seed_pass_is_bit_identical_to_the_full_pass_with_two_training_seeds(tmp_path: Path) -> None:
    cfg = cfgmod.from_dict({}, ["data.task=synthetic", "data.synthetic_samples=128",
                                "controller.isolation=inline"])
    tr = Trainer(cfg, RunDir.create(cfg, tmp_path / "run"))
    tr.build()
    try:
        for name in ("s1", "s2"):  # s2 sits downstream of s1: s1's pass runs s2's hook
            tr.kasmina.germinate(name, "residual_mlp", "test")
            tr.rebuild_optimizer("germinated")
            result = tr.kasmina.probe_g1(name, *tr.probe, _loss)
            tr.kasmina.start_training(name, result, "test")
            for p in tr.kasmina.slots[name].params():  # non-zero everywhere, so any difference shows
                torch.nn.init.normal_(p)
        slots = [tr.kasmina.slots["s1"], tr.kasmina.slots["s2"]]
        x, y = tr.probe
        tr.kasmina.forward(x)
        tr.kasmina.seed_passes(slots, x, y, _loss)
        suffix = _grads(slots)
        for s in slots:
            for p in s.params():
                p.grad = None
        for s in slots:
            tr.kasmina.seed_pass(s, x, y, _loss)  # no cached input: the full substituted forward
        full = _grads(slots)
        assert len(suffix) == len(full) > 0
        assert all(torch.equal(a, b) for a, b in zip(suffix, full, strict=True))
        assert any(float(g.abs().sum()) > 0 for g in suffix)
    finally:
        tr.close()
