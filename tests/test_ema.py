"""The weights' moving average (issue 27, ``trainer.ema``): its arithmetic, warm-up and seeds that come and go; it
never changes training; every validation, ``esper eval`` and ``esper export`` judge the averaged weights; a forged
average is refused. Its exact resume is in tests/test_resume.py (``accumulating-ema``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import GROWING, SYNTHETIC, UNHURRIED, esper, events, latest, manifest, metrics, out, tensors, train
from safetensors.torch import load_file
from torch import nn

from esper.core.errors import CheckpointError
from esper.core.tolaria.ema import WeightAverage


def test_the_average_follows_the_formula_with_its_warm_up_per_parameter() -> None:
    a, b = nn.Parameter(torch.tensor([0.0])), nn.Parameter(torch.tensor([4.0, 8.0]))
    named = [("host.a", a)]
    ema = WeightAverage(0.5, True, lambda: named)
    ema.update()  # a new parameter's average starts at its value
    with torch.no_grad():
        a.fill_(1.0)
    ema.update()  # after 0 updates: d = min(0.5, 1/10) = 0.1
    assert ema.average["host.a"].item() == pytest.approx(0.1 * 0.0 + 0.9 * 1.0)
    named.append(("host.b", b))  # a seed germinated: its own average from its own start
    with torch.no_grad():
        a.fill_(3.0)
    ema.update()  # a: after 1 update, d = 2/11
    assert ema.average["host.a"].item() == pytest.approx(2 / 11 * 0.9 + 9 / 11 * 3.0)
    assert torch.equal(ema.average["host.b"], b.detach()) and ema.updates == {"host.a": 2, "host.b": 0}
    named.pop()  # culled: its average goes with it
    ema.update()
    assert set(ema.average) == {"host.a"}
    plain = WeightAverage(0.5, False, lambda: [("host.a", a)])
    plain.update()
    with torch.no_grad():
        a.fill_(5.0)
    plain.update()
    assert plain.average["host.a"].item() == pytest.approx(0.5 * 3.0 + 0.5 * 5.0)


def test_applied_swaps_the_average_in_and_the_trained_weights_back_exactly() -> None:
    w = nn.Parameter(torch.randn(5, generator=torch.Generator().manual_seed(0)))
    trained = w.detach().clone()
    ema = WeightAverage(0.9, False, lambda: [("host.w", w)])
    ema.average, ema.updates = {"host.w": torch.zeros(5)}, {"host.w": 3}
    with ema.applied():
        assert torch.equal(w.detach(), torch.zeros(5))
    assert torch.equal(w.detach(), trained)
    with pytest.raises(RuntimeError, match="boom"), ema.applied():
        raise RuntimeError("boom")  # a failing validation still gives the trained weights back
    assert torch.equal(w.detach(), trained)


def test_a_forged_average_is_refused_before_anything_changes() -> None:
    w = nn.Parameter(torch.zeros(3))
    ema = WeightAverage(0.9, True, lambda: [("host.w", w)])
    ema.update()
    before = ema.average["host.w"].clone()
    forged = {
        "counts and tensors disagree": {"updates": {"host.w": 1}},
        "a parameter the run lacks": {"updates": {"host.x": 1}, "host.x": torch.zeros(3)},
        "a wrong shape": {"updates": {"host.w": 1}, "host.w": torch.zeros(4)},
        "a negative count": {"updates": {"host.w": -1}, "host.w": torch.zeros(3)},
    }
    for what, state in forged.items():
        with pytest.raises(CheckpointError, match="ema"):
            ema.load_state_dict(state)
        assert torch.equal(ema.average["host.w"], before) and ema.updates == {"host.w": 0}, what


@pytest.mark.slow
def test_the_average_never_changes_training_only_what_validation_sees(tmp_path: Path) -> None:
    host_only = [*SYNTHETIC, *UNHURRIED, "seeds.enabled=false", "trainer.epochs=3"]
    plain, averaged = tmp_path / "plain", tmp_path / "ema"
    assert train(plain, *host_only).exit_code == 0
    r = train(averaged, *host_only, "trainer.ema=0.9")
    assert r.exit_code == 0, out(r)
    model = tensors(latest(averaged), "model")
    assert all(torch.equal(model[k], v) for k, v in tensors(latest(plain), "model").items())  # the same steps
    ema = tensors(latest(averaged), "ema")
    trained = {k for k, v in model.items() if v.is_floating_point()}
    assert set(ema) <= trained and set(ema) and any(not torch.equal(ema[k], model[k]) for k in ema)
    assert metrics(averaged)[-1]["val_loss"] != metrics(plain)[-1]["val_loss"]
    assert metrics(averaged)[-1]["train_loss"] == metrics(plain)[-1]["train_loss"]


@pytest.mark.slow
def test_eval_and_export_use_the_averaged_weights_of_a_growing_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = train(run, *GROWING, "trainer.epochs=5", "trainer.ema=0.8")
    assert r.exit_code == 0, out(r)
    last = metrics(run)[-1]
    doc = json.loads(esper("eval", str(run), "--json").stdout)
    assert doc["weights"] == "ema"
    assert doc["metrics"]["val_loss"] == pytest.approx(last["val_loss"], rel=1e-6)  # the run's own validation
    exp = tmp_path / "exp"
    done = esper("export", str(run), "-o", str(exp), "--live", "--json")
    assert done.exit_code == 0, out(done)
    assert json.loads(done.stdout)["averaged"] is True
    exported = load_file(str(exp / "model.safetensors"))
    averages = tensors(latest(run), "ema")
    matched = []
    for key, avg in averages.items():
        slot, _, rest = key.removeprefix("seed.").partition(".")
        name = f"seeds.{slot}.{rest}" if key.startswith("seed.") else key
        if name in exported:  # a seed still TRAINING is not part of the exported network
            assert torch.equal(exported[name], avg), key
            matched.append(key)
    assert {k for k in averages if k.startswith("host.")} <= set(matched)
    assert any(k.startswith("seed.") for k in matched)  # a grown seed is exported with its own average


@pytest.mark.slow
def test_a_rollback_takes_the_average_back_with_the_weights(tmp_path: Path) -> None:
    """A NaN at epoch 2 rolls back to the start of the epoch: the average and its update counts go back with the
    weights, so every host parameter has had exactly one update per optimizer step kept (its first makes it)."""
    run = tmp_path / "run"
    r = train(run, *SYNTHETIC, *UNHURRIED, "seeds.enabled=false", "trainer.epochs=3", "trainer.ema=0.9",
              extra=["--fault", "nan_loss@2:3"])
    assert r.exit_code == 0, out(r)
    assert [e["attributes"]["tier"] for e in events(run, "rollback.completed")] == ["fast"]
    steps = metrics(run)[-1]["global_step"]
    assert steps == 3 * 6 - 1  # the bad batch is left out of the replay
    updates = manifest(latest(run))["ema"]["updates"]
    assert updates and set(updates.values()) == {steps - 1}
