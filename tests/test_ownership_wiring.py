"""Kasmina #19/#20 in the trainer: every optimized parameter has exactly one owner."""

from __future__ import annotations

from pathlib import Path

import pytest

from esper.core import config as cfgmod
from esper.core.model.optim import OptimizerError
from esper.core.records.rundir import RunDir
from esper.core.tolaria.trainer import Trainer


def _trainer(tmp_path: Path) -> Trainer:
    cfg = cfgmod.from_dict({}, ["data.task=synthetic", "data.synthetic_samples=64", "trainer.epochs=1",
                                "controller.isolation=inline"])
    tr = Trainer(cfg, RunDir.create(cfg, tmp_path / "run"))
    tr.build()
    return tr


def test_seed_reusing_a_host_parameter_is_a_conflict(tmp_path: Path) -> None:
    tr = _trainer(tmp_path)
    try:
        slot = tr.parts.kasmina.slots["s1"]
        tr.parts.kasmina.germinate("s1", "lowrank", "test")
        tr.parts.optimizer.rebuild("clean germination")  # one owner each: accepted
        assert slot.module is not None
        slot.module.stolen = tr.parts.host.head.weight  # type: ignore[assignment]  # now owned twice
        before = tr.parts.optimizer.optimizer
        with pytest.raises(OptimizerError, match="ownership"):
            tr.parts.optimizer.rebuild("germination that shares a host parameter")
        assert tr.parts.optimizer.optimizer is before, "the failed rebuild left the working optimizer in place"
    finally:
        tr.close()


def test_reregistering_the_host_forgets_culled_seeds(tmp_path: Path) -> None:
    tr = _trainer(tmp_path)
    try:
        tr.parts.kasmina.germinate("s1", "lowrank", "test")
        tr.parts.optimizer.rebuild("germinated")
        seed_param = tr.parts.kasmina.slots["s1"].params()[0]
        assert tr.parts.optimizer.ownership.owners(seed_param) == ("seed:s1",)
        tr.parts.kasmina.cull("s1", "test cull")
        tr.parts.optimizer.rebuild("culled")
        assert tr.parts.optimizer.ownership.owners(seed_param) == ()
        assert all(tr.parts.optimizer.ownership.owners(p) == ("host",) for p in tr.parts.host.parameters())
    finally:
        tr.close()
