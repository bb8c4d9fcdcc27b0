"""Blend telemetry (issue 14, Deliver 7): per seed per epoch, alpha mean and -- for channel and confidence
blending -- gate sparsity, in metrics.jsonl, in epoch.completed's slots and in the live slot table."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import GROWING, events, metrics, out, train

from esper.cli.view import slot_table
from esper.core.kasmina.blending import BlendSpec, blend, blend_weights, gate_sparsity


def test_blend_weights_are_what_blend_multiplies_the_seed_by() -> None:
    host, seed = torch.zeros(4, 3), torch.ones(4, 3)
    spec = BlendSpec("channel", 10, (1.0, 0.0, 0.5))
    w = blend_weights(host, 0.5, spec)
    assert w is not None and torch.equal(w, torch.tensor([0.5, 0.0, 0.25]))
    assert torch.equal(blend(host, seed, 0.5, spec)[0], w)
    assert gate_sparsity(w) == pytest.approx(1 / 3)
    logits = torch.tensor([[5.0, 0.0], [0.1, 0.0], [0.0, 3.0], [1.0, 1.0]])
    conf = BlendSpec("confidence", 10, confidence_margin=0.5)
    w = blend_weights(host, 1.0, conf, logits)
    assert w is not None and torch.allclose(blend(host, seed, 1.0, conf, logits)[:, 0], w)
    assert gate_sparsity(w) == pytest.approx(0.5)  # two samples the host is sure of: the seed has no say
    assert blend_weights(host, 0.3, BlendSpec("convex", 10)) is None


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "extra"), [("convex", []), ("channel", ["seeds.blend.channel_alpha=[1.0, 0.0, "
                                                                           "0.0, 1.0, 0.0, 1.0]"])])
def test_each_blended_epoch_reports_alpha_mean_and_gate_sparsity(mode: str, extra: list[str], tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = train(run, *GROWING, f'seeds.blend.mode="{mode}"', "seeds.blend.steps=30", "trainer.epochs=6", *extra)
    assert r.exit_code == 0, out(r)
    rows = metrics(run)
    blended = [(row["epoch"], name, t) for row in rows for name, t in row.get("blend", {}).items()]
    assert blended, f"no seed was blended in: {[row['seeds_by_stage'] for row in rows]}"
    alphas = [t["alpha_mean"] for _, _, t in blended]
    assert all(0.0 < a <= 1.0 for a in alphas) and any(a < 1.0 for a in alphas), blended  # the ramp, averaged
    for _, _, t in blended:
        assert t["steps"] > 0 and t["seed_id"]
        if mode == "channel":
            assert t["gate_sparsity"] >= 0.5  # three of six channels never take the seed
        else:
            assert "gate_sparsity" not in t
    completed = {e["attributes"]["global_step"]: e["attributes"] for e in events(run)
                 if e["event"] == "epoch.completed"}
    epoch, name, t = blended[0]
    row = next(r for r in rows if r["epoch"] == epoch)
    (view,) = [s for s in completed[row["global_step"]]["slots"] if s["slot"] == name]
    assert view["alpha_mean"] == t["alpha_mean"]
    assert not [r for r in rows if r["epoch"] < epoch and "blend" in r]  # the key comes with the first blend


def test_the_live_slot_table_shows_alpha_mean_and_gate_sparsity() -> None:
    table = slot_table([{"slot": "s1", "layer": "hidden1", "seed_id": "s1-1", "blueprint": "lowrank",
                         "stage": "BLENDING", "alpha": 0.5, "alpha_mean": 0.25, "gate_sparsity": 0.75,
                         "epochs_in_stage": 1}])
    headers = [c.header for c in table.columns]
    assert "alpha mean" in headers and "gate sparsity" in headers
    cells = {c.header: list(c.cells)[0].plain for c in table.columns}
    assert cells["alpha mean"] == "0.25" and cells["gate sparsity"] == "0.75"
