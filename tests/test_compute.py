"""Compute accounting (issue 24): FLOPs per phase counted on the real step, accumulated exactly as steps run,
kept by a rollback, carried by rows, summary and checkpoint; uncounted operators named; `esper plot --x flops`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import (
    GROWING,
    SYNTHETIC,
    UNHURRIED,
    esper,
    latest,
    make_config,
    metrics,
    out,
    rewrite_manifest,
    summary,
    train,
    verify,
)
from torch import nn

from esper.core.errors import ExitCode
from esper.core.model.host import build_host
from esper.core.tolaria.compute import ComputeMeter

PLAIN = [*SYNTHETIC, *UNHURRIED, "seeds.enabled=false", "trainer.epochs=2"]
BATCH, VAL = 64, 128  # synthetic: 384 training samples in batches of 64 (6 steps), 128 validated at once


def _linears() -> list[nn.Linear]:
    cfg = make_config(*PLAIN)
    return [m for m in build_host(cfg, (cfg.data.synthetic_features,), cfg.data.synthetic_classes).modules()
            if isinstance(m, nn.Linear)]


def test_the_flops_of_a_plain_mlp_are_its_matrix_multiplies_counted_exactly(tmp_path: Path) -> None:
    layers = _linears()
    macs = sum(m.in_features * m.out_features for m in layers)
    first = layers[0].in_features * layers[0].out_features  # no gradient is computed for the data
    result = train(tmp_path / "r", *PLAIN)
    assert result.exit_code == 0, out(result)
    s = summary(tmp_path / "r")
    steps, by_phase = s["global_step"], s["compute"]["by_phase"]
    assert steps == 12
    assert by_phase["forward"] == steps * 2 * BATCH * macs
    assert by_phase["backward"] == steps * 2 * BATCH * (2 * macs - first)
    assert by_phase["seeds"] == 0
    assert by_phase["validation"] == 2 * 2 * VAL * macs  # one validation pass per epoch
    rows = metrics(tmp_path / "r")
    assert [r["flops"] for r in rows] == [(by_phase["forward"] + by_phase["backward"]) * e // 2 for e in (1, 2)]
    assert s["compute"]["flops"] == rows[-1]["flops"] and s["compute"]["uncounted_ops"] == {}
    assert all(r["step_seconds"] > 0 for r in rows) and rows[1]["step_seconds"] > rows[0]["step_seconds"]


def test_growing_seeds_cost_flops_of_their_own_and_every_phase_is_counted(tmp_path: Path) -> None:
    result = train(tmp_path / "g", *GROWING, "trainer.epochs=4")
    assert result.exit_code == 0, out(result)
    rows = metrics(tmp_path / "g")
    per_epoch = [b["flops"] - a["flops"] for a, b in zip([{"flops": 0}, *rows], rows, strict=False)]
    assert summary(tmp_path / "g")["compute"]["by_phase"]["seeds"] > 0  # TRAINING seeds' own passes
    assert per_epoch[-1] > per_epoch[0]  # the grown network costs more per step than the host alone
    assert all(b["flops_validation"] > a["flops_validation"] for a, b in zip(rows, rows[1:], strict=False))


def test_a_rollback_keeps_the_compute_of_the_steps_it_undid(tmp_path: Path) -> None:
    assert train(tmp_path / "straight", *PLAIN).exit_code == 0
    faulted = train(tmp_path / "fault", *PLAIN, extra=["--fault", "nan_loss@2:3"])
    assert faulted.exit_code == 0, out(faulted)
    a, b = summary(tmp_path / "straight"), summary(tmp_path / "fault")
    assert len(b["rollbacks"]) == 1 and b["skipped_batches"]  # the bad batch is left out of the replay
    fa, fb = a["compute"]["by_phase"], b["compute"]["by_phase"]
    step_fwd, step_bwd = fa["forward"] // a["global_step"], fa["backward"] // a["global_step"]
    assert fb["forward"] % step_fwd == 0 and fb["backward"] % step_bwd == 0
    forwards, backwards = fb["forward"] // step_fwd, fb["backward"] // step_bwd
    # epoch 1 (6 steps), epoch 2's steps 0-2 undone by the rollback (counted: they ran), the bad step's forward
    # (its backward never ran), then epoch 2 replayed without the bad batch (5 steps)
    assert (forwards, backwards) == (6 + 3 + 1 + 5, 6 + 3 + 5)
    assert b["global_step"] == 6 + 5


def test_an_operator_the_table_cannot_count_is_named_never_a_silent_zero(tmp_path: Path) -> None:
    result = train(tmp_path / "c", *PLAIN, 'host.factory="plugins_fixture:custom_op_host"')
    assert result.exit_code == 0, out(result)
    compute = summary(tmp_path / "c")["compute"]
    assert "esper_test.double" in compute["uncounted_ops"]
    assert compute["by_phase"]["forward"] > 0  # the linears around it are still counted


def test_the_meter_counts_nothing_for_a_block_that_raised() -> None:
    meter, layer = ComputeMeter(world_size=2), nn.Linear(4, 3)
    with pytest.raises(RuntimeError), meter.phase("forward", "k"):
        layer(torch.ones(5, 4))
        raise RuntimeError("the step failed")
    assert meter.flops["forward"] == 0
    for _ in range(2):
        with meter.phase("forward", "k"):
            layer(torch.ones(5, 4))
    assert meter.flops["forward"] == 2 * (2 * 5 * 4 * 3) * 2  # two steps, counted once, times the world size
    restored = ComputeMeter()
    restored.load_state_dict(json.loads(json.dumps(meter.state_dict())))
    assert restored.flops == meter.flops


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["flops"].update(forward=-1), "non-negative"),
    (lambda c: c["flops"].update(teleport=5), "teleport"),
    (lambda c: c.update(train_seconds="soon"), "train_seconds"),
])
def test_a_forged_compute_record_fails_verification(tmp_path: Path, edit: object, message: str) -> None:
    assert train(tmp_path / "r", *PLAIN).exit_code == 0
    ckpt = latest(tmp_path / "r")
    rewrite_manifest(ckpt, lambda m: edit(m["compute"]))  # type: ignore[operator]
    result = verify(ckpt)
    assert result.exit_code == ExitCode.CHECKPOINT, out(result)
    assert message in out(result) and "Traceback" not in out(result)


def test_plot_against_flops_and_a_run_without_flop_counts(tmp_path: Path) -> None:
    run = tmp_path / "r"
    assert train(run, *PLAIN).exit_code == 0
    result = esper("plot", str(run), "--x", "flops", "-o", str(tmp_path / "f.png"))
    assert result.exit_code == 0, out(result)
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [{k: v for k, v in r.items() if k != "flops"} for r in metrics(run)]  # as Esper wrote before counting
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = esper("plot", str(run), "--x", "flops", "-o", str(tmp_path / "g.png"))
    assert result.exit_code == ExitCode.USAGE and "no FLOP counts" in out(result)
    assert not (tmp_path / "g.png").exists()
    assert esper("plot", str(run), "--x", "parsecs").exit_code == ExitCode.USAGE


@pytest.mark.parametrize("groups", [1, 2, 24])
def test_a_grouped_convolutions_backward_costs_twice_its_forward(groups: int) -> None:
    """torch's table counted a depthwise conv's backward at 25x its forward (the input gradient as if ungrouped)."""
    meter, conv = ComputeMeter(), nn.Conv1d(24, 24, 5, padding=2, groups=groups)
    x = torch.randn(8, 24, 19, requires_grad=True)
    with meter.phase("forward", "k"):
        y = conv(x)
    with meter.phase("backward", "k"):
        y.sum().backward()
    assert meter.flops["forward"] == 2 * 8 * 19 * 24 * (24 // groups) * 5
    assert meter.flops["backward"] == 2 * meter.flops["forward"]  # the input's and the weights' gradients
