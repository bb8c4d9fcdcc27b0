"""Gradient accumulation (issue 27, ``trainer.accumulate_steps``): windows aligned to the epoch, the mean gradient
of a window equal to one larger batch's, and a checkpoint inside a window that refuses to be forged. The resume
from a stop inside a window, bit for bit an uninterrupted run, is in tests/test_resume.py (``accumulating-ema``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import (
    SYNTHETIC,
    UNHURRIED,
    assert_same_tensors,
    esper,
    latest,
    manifest,
    metrics,
    out,
    resume,
    rewrite_manifest,
    sets,
    tensors,
    train,
)
from torch import nn

from esper.core.errors import CheckpointError, ExitCode
from esper.core.tolaria.accumulate import Accumulation

HOST_ONLY = [*SYNTHETIC, *UNHURRIED, "seeds.enabled=false", "trainer.epochs=2"]


def _params(*shapes: tuple[int, ...]) -> list[tuple[str, nn.Parameter]]:
    return [(f"host.p{i}", nn.Parameter(torch.zeros(s))) for i, s in enumerate(shapes)]


def test_windows_are_aligned_to_the_epoch_and_the_last_may_be_shorter() -> None:
    acc = Accumulation(4, lambda: [])
    assert [acc.window(i, 6, ()) for i in range(6)] == [(4, False), (4, False), (4, False), (4, True),
                                                        (2, False), (2, True)]
    # a batch the skip record leaves out shortens its window; a window whose last batch is skipped ends earlier
    assert [acc.window(i, 6, {3}) for i in (0, 1, 2)] == [(3, False), (3, False), (3, True)]
    assert Accumulation(1, lambda: []).window(5, 6, ()) == (1, True)


def test_the_window_means_its_seed_figures_and_a_bad_step_drops_them() -> None:
    acc = Accumulation(3, lambda: [])
    acc.add(3, [1.0, 10.0])
    acc.add(4, [3.0, 20.0])
    assert (acc.pending, acc.start) == (2, 3)
    assert acc.close() == [2.0, 15.0] and acc.pending == 0  # one G2 step per window, its batches' mean
    acc.add(6, [5.0, 1.0])
    acc.reset()
    acc.add(7, [7.0, 2.0])
    assert acc.close() == [7.0, 2.0]


def test_a_window_whose_remaining_batches_are_left_out_is_closed_where_it_is_found() -> None:
    acc = Accumulation(4, lambda: [])
    assert not acc.left_open(None) and not acc.left_open(5)  # nothing pending
    acc.add(4, [1.0])
    assert not acc.left_open(5)  # batch 5 is the same window's
    assert acc.left_open(8) and acc.left_open(None)  # a later window, or the epoch's end


@pytest.mark.slow
def test_two_batches_accumulated_train_like_one_batch_twice_as_large(tmp_path: Path) -> None:
    """12 batches of 32 in windows of 2 against 6 batches of 64 over the same sample order: the same steps, the
    same weights up to float summation order; without accumulation the 32s take 12 steps and land elsewhere."""
    runs = {}
    for name, items in {"acc": ["data.batch_size=32", "trainer.accumulate_steps=2"],
                        "large": ["data.batch_size=64"], "small": ["data.batch_size=32"]}.items():
        r = train(tmp_path / name, *HOST_ONLY, *items)
        assert r.exit_code == 0, out(r)
        runs[name] = tmp_path / name
    steps = {name: metrics(run)[-1]["global_step"] for name, run in runs.items()}
    assert steps == {"acc": 12, "large": 12, "small": 24}
    acc, large, small = (tensors(latest(runs[n]), "model") for n in ("acc", "large", "small"))
    for key in large:
        torch.testing.assert_close(acc[key], large[key], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(small[k], large[k], rtol=1e-3, atol=1e-4) for k in large)


def test_loading_a_window_checks_what_it_is_given() -> None:
    named = _params((2,), (3,))
    acc = Accumulation(4, lambda: named)
    grad = torch.ones(2)
    acc.load_state_dict({"pending": 2, "window": 4, "measured": [0.5], "grad.host.p0": grad})
    assert (acc.pending, acc.start) == (2, 4) and set(acc.sums) == {"host.p0"}
    assert torch.equal(acc.sums["host.p0"], grad) and acc.sums["host.p0"] is not grad  # copied, never kept
    assert set(acc.state_dict()) == {"pending", "window", "measured", "grad.host.p0"}
    forged = {
        "pending 4 in a window of 4": {"pending": 4, "window": 0, "measured": []},
        "gradients outside a window": {"pending": 0, "window": 0, "measured": [], "grad.host.p0": grad},
        "a parameter the run lacks": {"pending": 1, "window": 0, "measured": [], "grad.host.nope": grad},
        "a wrong shape": {"pending": 1, "window": 0, "measured": [], "grad.host.p1": grad},
        "a non-finite figure": {"pending": 1, "window": 0, "measured": [float("nan")]},
        "a window that does not start one": {"pending": 1, "window": 3, "measured": []},
    }
    for what, state in forged.items():
        with pytest.raises(CheckpointError, match="accumulation"):
            acc.load_state_dict(state)
        # a refused state changes nothing
        assert acc.pending == 2 and acc.start == 4 and torch.equal(acc.sums["host.p0"], grad), what


def test_a_window_resumed_inside_it_and_shortened_by_a_rollback_sums_as_a_straight_one() -> None:
    """The campaign's case (issue 26): a run resumed one batch into a window, then a NaN on the window's second
    batch rolls back to the resume point and skips that batch; the straight run rolled back to the window's start
    and replayed it without the batch. Both windows hold batches 0, 2 and 3: the optimizer must see one mean."""
    gen = torch.Generator().manual_seed(7)
    g = [torch.randn(5, generator=gen) for _ in range(4)]
    w = nn.Parameter(torch.zeros(5))

    def take(acc: Accumulation, i: int) -> None:
        w.grad = g[i].clone()
        acc.add(i, [float(i)])

    straight = Accumulation(4, lambda: [("host.w", w)])
    for i in (0, 2, 3):
        take(straight, i)
    assert straight.close() == [5 / 3]
    expected = w.grad.clone()
    first = Accumulation(4, lambda: [("host.w", w)])
    take(first, 0)
    saved = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in first.state_dict().items()}
    resumed = Accumulation(4, lambda: [("host.w", w)])
    resumed.load_state_dict(saved)
    for i in (2, 3):
        take(resumed, i)
    assert resumed.close() == [5 / 3]
    assert torch.equal(w.grad, expected)


@pytest.mark.slow
def test_a_forged_window_in_a_stop_checkpoint_is_refused_on_resume(tmp_path: Path) -> None:
    run = tmp_path / "run"
    items = [*HOST_ONLY, "trainer.accumulate_steps=4"]
    stopped = train(run, *items, extra=["--fault", "sigterm@2:1"])  # stop after batch 1 of epoch 2: mid-window
    assert stopped.exit_code == ExitCode.SIGTERM, out(stopped)
    ckpt = latest(run)
    assert manifest(ckpt)["accumulation"]["pending"] == 2 and tensors(ckpt, "accumulation")
    original = manifest(ckpt)

    def forge(doc: dict) -> None:
        doc["accumulation"]["pending"] = 9  # more batches than a window holds, sealed like a real manifest

    rewrite_manifest(ckpt, forge)
    r = resume(run, *items)
    assert r.exit_code == ExitCode.CHECKPOINT, out(r)
    assert "accumulation" in out(r) and "Traceback" not in out(r)
    assert manifest(ckpt)["global_step"] == original["global_step"]  # nothing was trained or rewritten


@pytest.mark.slow
def test_a_window_cut_short_after_a_resume_steps_as_the_straight_run_did(tmp_path: Path) -> None:
    """Windows of 4 of 6 batches: [0-3], [4, 5]. Stopped after batch 4 of epoch 3 (a window open), resumed, and a NaN
    at batch 5 rolls back to the resume point and leaves batch 5 out: the window's last batch taken is behind the
    resumed run. The straight run rolled back to the epoch's start and stepped at batch 4 as a window of one; the
    resumed one steps on the open window at the epoch's end: the same steps, bit for bit."""
    items = [*HOST_ONLY, "trainer.epochs=4", "trainer.accumulate_steps=4"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    r = train(straight, *items, extra=["--fault", "nan_loss@3:5"])
    assert r.exit_code == 0, out(r)
    stopped = train(split, *items, extra=["--fault", "sigterm@3:4"])
    assert stopped.exit_code == ExitCode.SIGTERM, out(stopped)
    assert manifest(latest(split))["accumulation"]["pending"] == 1
    r = esper("train", "--quiet", "--resume", str(split), *sets(*items), "--fault", "nan_loss@3:5")
    assert r.exit_code == 0, out(r)
    assert [m["global_step"] for m in metrics(split)] == [m["global_step"] for m in metrics(straight)]
    assert_same_tensors(tensors(latest(straight), "model"), tensors(latest(split), "model"))
