"""Everything the shell does works on every host kind (issue 13, Deliver 9): the built-in mlp, the cnn on 1-D
signals (MNIST-1D) and on 2-D images (digits_images), and a user host (tests/plugins_fixture.py) — exact resume
(bit-identical on CPU) across live seeds, field reports, inspect-checkpoint, a drill's fast rollback with the
batch skipped, and the full rollback to the last verified checkpoint. Each case is a few epochs of small batches."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    UNHURRIED,
    assert_same_tensors,
    break_fast_tier,
    esper,
    events,
    latest,
    metrics_without_wall_clock,
    out,
    resume,
    summary,
    tensors,
    train,
)

SLOTS = "seeds.slots=[{{name='s1', layer='{0}'}}, {{name='s2', layer='{1}'}}]"
CONV = ["seeds.blueprints=['conv_block']", "seeds.blend.mode='residual'"]
HOSTS: dict[str, list[str]] = {
    "mlp": ["data.task=synthetic", "host.factory=mlp"],
    "cnn1d": ["data.task=mnist1d", "data.batch_size=400", "host.factory=cnn", "host.channels=[4, 4]",
              "host.kernels=[5, 3]", SLOTS.format("conv1", "conv2"), *CONV],
    "cnn2d": ["data.task=digits_images", "data.batch_size=256", "host.factory=cnn", "host.channels=[4, 4]",
              "host.kernels=[3, 3]", "host.stride=1", SLOTS.format("conv1", "conv2"), *CONV],
    "user": ["data.task=digits_images", "data.batch_size=256", "host.factory=plugins_fixture:make_cnn",
             SLOTS.format("block1", "block2"), *CONV],
}
# the slot kind each host's first slot must have been given
KINDS = {"mlp": "features", "cnn1d": "channels1d", "cnn2d": "channels2d", "user": "channels2d"}
# germinate at the first decision, pass G2 after one epoch, fossilize whatever the gain; report after one epoch
GROW = [*UNHURRIED, "controller.plateau_min_delta=1.0", "controller.warmup_epochs=0", "controller.plateau_window=1",
        "seeds.min_training_epochs=1", "seeds.g2_min_improvement=0.0", "seeds.blend.steps=4",
        "controller.fossilize_min_improvement=-10.0", "controller.report_window_epochs=1",
        "controller.isolation=inline", 'trainer.lr_policy="constant"', "rollback.fast_sla_ms=600000.0"]


def job(host: str, *items: str) -> list[str]:
    return [*HOSTS[host], *GROW, *items]


def field_reports(run: Path) -> list[dict[str, Any]]:
    """Field report bodies without what differs between two runs of one job (run id, issue time)."""
    path = run / "field_reports.jsonl"
    rows = [json.loads(line)["body"] for line in path.read_text().splitlines()] if path.exists() else []
    return [{k: v for k, v in r.items() if k not in ("run_id", "issued_at")} for r in rows]


def stages(run: Path) -> list[tuple[str, str, str | None, list[str]]]:
    return [(s["slot"], s["stage"], s["blueprint"], [h["dest"] for h in s["history"]]) for s in summary(run)["seeds"]]


@pytest.mark.slow
@pytest.mark.parametrize("host", list(HOSTS))
def test_exact_resume_field_reports_and_inspect_on_every_host(host: str, tmp_path: Path) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    r = train(straight, *job(host, "trainer.epochs=6"))
    assert r.exit_code == 0, out(r)
    r = train(split, *job(host, "trainer.epochs=3"))
    assert r.exit_code == 0, out(r)
    alive = {s["stage"] for s in summary(split)["seeds"]}
    assert alive & {"TRAINING", "BLENDING", "SHADOWING", "PROBATIONARY"}, alive  # the resume crosses live seeds
    r = resume(split, *job(host, "trainer.epochs=6"), allow=["trainer.epochs"])
    assert r.exit_code == 0, out(r)

    for stem in ("model", "optimizer", "rng"):
        assert_same_tensors(tensors(latest(straight), stem), tensors(latest(split), stem))
    assert metrics_without_wall_clock(straight) == metrics_without_wall_clock(split)
    assert stages(straight) == stages(split)
    assert any("PROBATIONARY" in dests for _, _, _, dests in stages(straight)), stages(straight)
    # a completed session files the windows still open as short reports (T-12): the split's first session ended
    # at epoch 3, so it has those as well; every full report and the straight run's short ones are the same
    reports, resumed = field_reports(straight), field_reports(split)
    full = [r for r in reports if not r["short_window"]]
    assert full and full == [r for r in resumed if not r["short_window"]]
    extra = [r for r in resumed if r["short_window"] and r not in reports]
    assert [r for r in resumed if r not in extra] == reports
    assert all(r["applied_epoch"] <= 3 for r in extra)
    g0 = next(e for e in events(straight, "gate.result") if e["attributes"]["gate"] == "G0")
    assert g0["attributes"]["attributes"]["slot_shape"].startswith(KINDS[host] + " [N, ")

    ckpt = latest(split)
    r = esper("inspect-checkpoint", str(ckpt), "--verify", "--json")
    assert r.exit_code == 0, out(r)
    doc = json.loads(r.stdout)
    assert doc["integrity"]["ok"] is True
    final = {s["slot"]: (s["stage"], s["blueprint"]) for s in summary(split)["seeds"]}
    assert {s["slot"]: (s["stage"], s["blueprint"]) for s in doc["seeds"]} == final
    holding = [slot for slot, (stage, _) in final.items() if stage not in ("DORMANT", "CULLED", "EMBARGOED")]
    assert holding, final
    names = list(tensors(ckpt, "model"))
    for slot in holding:
        assert any(k.startswith(f"seed.{slot}.") for k in names), f"the checkpoint holds no seed of slot {slot}"


@pytest.mark.slow
@pytest.mark.parametrize("host", list(HOSTS))
def test_a_nan_drill_rolls_back_fast_and_skips_the_batch_on_every_host(host: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = train(run, *job(host, "trainer.epochs=3"), extra=["--fault", "nan_loss@2:1"])
    assert r.exit_code == 0, out(r)
    [done] = events(run, "rollback.completed")
    assert (done["attributes"]["tier"], done["attributes"]["cause"]) == ("fast", "non_finite_loss")
    assert done["attributes"]["skip"]["epoch"] == 2 and done["attributes"]["skip"]["step"] == 1
    [skipped] = events(run, "batch.skipped")
    assert skipped["seq"] > done["seq"]
    s = summary(run)
    assert (s["status"], s["epochs_completed"]) == ("COMPLETED", 3)
    assert [(b["epoch"], b["step"]) for b in s["skipped_batches"]] == [(2, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("host", list(HOSTS))
def test_a_failed_fast_tier_falls_through_to_the_full_rollback_on_every_host(
        host: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    break_fast_tier(monkeypatch)
    run = tmp_path / "run"
    r = train(run, *job(host, "trainer.epochs=3"), extra=["--fault", "nan_loss@2:1"])
    assert r.exit_code == 0, out(r)
    [done] = events(run, "rollback.completed")
    assert done["attributes"]["tier"] == "full"
    assert "structural restore failed" in done["attributes"]["fell_through"]
    s = summary(run)
    assert (s["status"], s["epochs_completed"]) == ("COMPLETED", 3)
    assert [r["tier"] for r in s["rollbacks"]] == ["full"]
