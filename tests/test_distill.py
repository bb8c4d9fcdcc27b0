"""Knowledge distillation for seeds (issue 14, Deliver 6): a TRAINING seed's own loss adds the KL divergence to
the host's detached output; host gradients and weights stay bit-identical with and without it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import GROWING, make_config, seed_to_training

from esper.core.config import DistillConfig
from esper.core.kasmina.distill import distill_loss
from esper.core.records.rundir import RunDir
from esper.core.tolaria.train_state import EpochStats
from esper.core.tolaria.trainer import Trainer


def test_the_kl_term_is_zero_at_the_teacher_and_scales_with_weight_and_temperature() -> None:
    teacher = torch.randn(4, 7, 11)
    assert float(distill_loss(teacher.clone(), teacher, DistillConfig(enabled=True))) == pytest.approx(0.0, abs=1e-6)
    student = torch.randn(4, 7, 11)
    one = float(distill_loss(student, teacher, DistillConfig(enabled=True, temperature=1.0, weight=1.0)))
    p, q = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
    assert one == pytest.approx(float((q.exp() * (q - p)).sum(-1).mean()), rel=1e-5)  # per-token KL(q || p)
    half = float(distill_loss(student, teacher, DistillConfig(enabled=True, temperature=1.0, weight=0.5)))
    assert half == pytest.approx(one / 2, rel=1e-6)
    hot = float(distill_loss(student, teacher, DistillConfig(enabled=True, temperature=3.0, weight=1.0)))
    assert hot > 0 and not math.isclose(hot, one)
    grads = torch.autograd.grad(distill_loss(student.requires_grad_(), teacher.requires_grad_(),
                                             DistillConfig(enabled=True)), [student, teacher], allow_unused=True)
    assert grads[0] is not None and grads[1] is None  # the teacher is detached


def _steps(tmp_path: Path, distill: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[float]]:
    cfg = make_config(*GROWING, f"seeds.distill.enabled={str(distill).lower()}", "seeds.distill.weight=2.0")
    tr = Trainer(cfg, RunDir.create(cfg, tmp_path / ("on" if distill else "off")), controller_factory=None)
    try:
        p = tr.build()
        tr.machine.fire("ready", reason="test")
        slot = seed_to_training(p.kasmina, "s1", "residual_mlp", *p.probe)
        p.optimizer.rebuild("test")
        host_grads: list[float] = []
        for _ in range(3):
            assert tr.train_step(*p.probe, EpochStats())
            host_grads.append(float(sum(q.grad.double().sum() for q in p.host.parameters() if q.grad is not None)))
        host = {k: v.detach().clone() for k, v in p.host.state_dict().items()}
        seed = {k: v.detach().clone() for k, v in slot.module.state_dict().items()}  # type: ignore[union-attr]
        return host, seed, host_grads
    finally:
        tr.close()


def test_distillation_moves_the_seed_and_leaves_the_host_bit_identical(tmp_path: Path) -> None:
    host_off, seed_off, grads_off = _steps(tmp_path, distill=False)
    host_on, seed_on, grads_on = _steps(tmp_path, distill=True)
    assert grads_on == grads_off
    assert all(torch.equal(host_on[k], host_off[k]) for k in host_off)
    assert any(not torch.equal(seed_on[k], seed_off[k]) for k in seed_off)  # the KL term reached the seed
