"""H-6: after an ELEVATED rollback for a loss spike or a non-finite loss, the batch that raised it is left out of
the replay (and of every later one), recorded in the rollback's event and in the checkpoint, so a resume trains
exactly what the straight run trained. And with ``data.drop_last`` (the default) a tiny remainder batch, the
usual source of such false alarms, never exists."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import (
    SYNTHETIC,
    UNHURRIED,
    assert_same_tensors,
    events,
    latest,
    manifest,
    metrics,
    out,
    resume,
    summary,
    tensors,
    train,
)

from esper.core.data import BatchSkips
from esper.core.errors import CheckpointError
from esper.core.tolaria import Components, Layout

# The run of issue 13: a small CNN host (a user factory) on the digits as images, seeds disabled, batch 64.
# 1,348 training samples: 21 full batches and, without drop_last, a 4-sample remainder as batch 21.
CNN_ON_DIGITS = [*UNHURRIED, "data.task=digits_images", "host.factory=plugins_fixture:make_cnn",
                 "seeds.enabled=false", "data.batch_size=64", "trainer.epochs=22"]


@pytest.mark.slow
def test_the_remainder_batch_spike_is_skipped_on_the_replay_and_the_run_completes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = train(run, *CNN_ON_DIGITS, "data.drop_last=false")
    assert result.exit_code == 0, out(result)
    s = summary(run)
    assert s["status"] == "COMPLETED" and s["epochs_completed"] == 22
    # the false alarm: the remainder batch of epoch 21, its loss over 10x the EWMA (this run used to HALT there,
    # replaying that batch three times)
    (rb,) = s["rollbacks"]
    assert (rb["cause"], rb["epoch"], rb["tier"]) == ("loss_explosion", 21, "fast")
    assert rb["skip"] == {"epoch": 21, "step": 21, "cause": "loss_explosion", "global_step": rb["global_step_before"]}
    assert rb["global_step_before"] == 20 * 22 + 21  # the step of batch 21 of epoch 21
    assert s["skipped_batches"] == [rb["skip"]]
    (done,) = events(run, "rollback.completed")
    assert done["attributes"]["skip"] == rb["skip"]  # the event says what the replay will leave out
    (skipped,) = events(run, "batch.skipped")
    assert (skipped["epoch"], skipped["attributes"]["step"]) == (21, 21)
    assert skipped["seq"] > done["seq"]
    rows = metrics(run)
    assert [r["global_step"] for r in rows[19:]] == [20 * 22, 20 * 22 + 21, 20 * 22 + 21 + 22]  # 21 steps in epoch 21
    assert rows[20]["skipped_steps"] == 0 and rows[-1]["val_accuracy"] > 0.9
    # the skip is part of every later checkpoint (so a resume from one leaves the batch out too)
    assert manifest(latest(run))["data"] == {"skipped": [rb["skip"]]}


@pytest.mark.slow
def test_with_the_default_drop_last_the_remainder_batch_never_exists(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = train(run, *CNN_ON_DIGITS)
    assert result.exit_code == 0, out(result)
    s = summary(run)
    assert s["status"] == "COMPLETED" and s["rollbacks"] == [] and s["skipped_batches"] == []
    assert [r["global_step"] for r in metrics(run)] == [21 * e for e in range(1, 23)]  # 1,348 // 64 steps an epoch
    assert events(run, "run.started")[0]["attributes"]["steps_per_epoch"] == 21


# A run whose only rollback misses its SLA: HALT, with an emergency checkpoint of last-known-good (end of epoch
# 1) that already records the skip of batch 1 of epoch 2.
SPIKE = [*SYNTHETIC, *UNHURRIED, "seeds.enabled=false", "trainer.epochs=4", "controller.isolation=inline"]


@pytest.mark.slow
def test_a_resume_from_the_halts_checkpoint_skips_the_batch_and_trains_what_the_straight_run_trained(
        tmp_path: Path) -> None:
    straight, halted = tmp_path / "straight", tmp_path / "halted"
    r = train(straight, *SPIKE, extra=["--fault", "loss_spike@2:1"])
    assert r.exit_code == 0, out(r)
    assert [b["step"] for b in summary(straight)["skipped_batches"]] == [1]

    r = train(halted, *SPIKE, "rollback.fast_sla_ms=0.000001", "rollback.full_sla_ms=0.000001",
              extra=["--fault", "loss_spike@2:1"])
    assert r.exit_code == 6, out(r)
    ckpt = halted / "checkpoints" / "epoch-0001-emergency"
    assert manifest(ckpt)["data"]["skipped"] == summary(halted)["skipped_batches"] == summary(straight)[
        "skipped_batches"]
    r = resume(ckpt, *SPIKE, allow=["rollback.fast_sla_ms", "rollback.full_sla_ms", "faults"])
    assert r.exit_code == 0, out(r)
    s = summary(halted)
    assert s["status"] == "COMPLETED" and [rb["within_sla"] for rb in s["rollbacks"]] == [False]  # the HALT's own
    names = [e["event"] for e in events(halted)]
    later = events(halted)[names.index("resumed"):]  # in file order (each process numbers its own events)
    assert [e["event"] for e in later if e["event"].startswith("rollback.")] == []  # no second spike ...
    assert [e["attributes"]["step"] for e in later if e["event"] == "batch.skipped"] == [1]  # ... it was left out
    assert latest(halted).name == latest(straight).name == "epoch-0004"
    for stem in ("model", "optimizer", "rng"):
        assert_same_tensors(tensors(latest(halted), stem), tensors(latest(straight), stem))
    training = ("epoch", "global_step", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "params")
    assert [{k: row[k] for k in training} for row in metrics(halted)] == \
        [{k: row[k] for k in training} for row in metrics(straight)]


def test_a_checkpoint_from_before_the_skip_record_means_no_skipped_batch() -> None:
    components = Components()
    skips = BatchSkips()
    skips.add(3, 4, "loss_explosion", 10)
    components.register("data", skips, Layout(key="data", absent=BatchSkips.ABSENT))
    old = components.from_checkpoint({}, {"epoch": 3})  # an fdf50af manifest: no "data" key
    assert old == {"data": {"skipped": []}}
    components.load_state_dict(old)
    assert skips.skipped == [] and skips.steps(3) == frozenset()
    strict = Components()
    strict.register("data", BatchSkips(), Layout(key="data"))
    with pytest.raises(CheckpointError, match="data"):
        strict.from_checkpoint({}, {"epoch": 3})


def test_the_skip_record_round_trips_and_names_each_batch_once() -> None:
    skips = BatchSkips()
    first = skips.add(2, 5, "non_finite_loss", 40)
    skips.add(2, 5, "loss_explosion", 41)  # the same batch again: still one entry, the first cause
    skips.add(3, 0, "loss_explosion", 60)
    again = BatchSkips()
    again.load_state_dict(skips.state_dict())
    assert again.skipped == skips.skipped and again.cause(2, 5) == first
    assert (again.steps(2), again.steps(3), again.steps(4)) == (frozenset({5}), frozenset({0}), frozenset())
