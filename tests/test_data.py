"""Tasks as a protocol (H-3, H-4): the resumable sampler, the DataLoaders, the built-in tasks and user factories."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    SYNTHETIC,
    UNHURRIED,
    assert_same_tensors,
    events,
    latest,
    make_config,
    metrics,
    metrics_without_wall_clock,
    out,
    summary,
    tensors,
    train,
)
from torch.utils.data import Dataset

from esper.core.data import (
    EpochBatches,
    build_task,
    classification,
    epoch_order,
    fetch,
    mnist1d_arrays,
    steps_per_epoch,
    train_batches,
    val_batches,
)
from esper.core.errors import ConfigError, ExitCode

FAST = [*SYNTHETIC, *UNHURRIED, "controller.isolation=inline"]


# --------------------------------------------------------------------------------------------- the sampler


def batches_of(sampler: EpochBatches) -> list[list[int]]:
    return list(sampler)


def test_the_order_is_todays_permutation_cut_into_batches() -> None:
    order = torch.randperm(100, generator=torch.Generator().manual_seed(7 * 1_000_003 + 3)).tolist()
    assert epoch_order(100, 7, 3).tolist() == order  # results stay comparable with runs before tasks
    got = batches_of(EpochBatches(100, 32, False, 7, 3))
    assert got == [order[0:32], order[32:64], order[64:96], order[96:100]]
    assert batches_of(EpochBatches(100, 32, True, 7, 3)) == got[:3]  # drop_last: no 4-sample remainder


def test_the_order_is_a_pure_function_of_seed_and_epoch() -> None:
    a = batches_of(EpochBatches(50, 8, True, 1, 2))
    assert a == batches_of(EpochBatches(50, 8, True, 1, 2))
    assert a != batches_of(EpochBatches(50, 8, True, 1, 3)) and a != batches_of(EpochBatches(50, 8, True, 2, 2))


@pytest.mark.parametrize("drop_last", [True, False])
def test_a_sampler_started_at_batch_k_gives_the_rest_of_the_epoch(drop_last: bool) -> None:
    whole = batches_of(EpochBatches(101, 10, drop_last, 5, 9))
    assert len(whole) == steps_per_epoch(101, 10, drop_last) == (10 if drop_last else 11)
    for k in range(len(whole) + 1):
        part = EpochBatches(101, 10, drop_last, 5, 9, start=k)
        assert batches_of(part) == whole[k:] and part.positions == list(range(k, len(whole)))


def test_skipped_batches_are_left_out_and_the_others_keep_their_samples() -> None:
    whole = batches_of(EpochBatches(64, 8, True, 3, 1))
    s = EpochBatches(64, 8, True, 3, 1, start=2, skip=frozenset({4, 6}))
    assert s.positions == [2, 3, 5, 7] and len(s) == 4
    assert batches_of(s) == [whole[2], whole[3], whole[5], whole[7]]


class NoisyDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Draws from torch's, numpy's and Python's RNGs in __getitem__ (as augmentation would)."""

    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.rand(1).item() + float(np.random.rand()) + random.random()
        return torch.tensor([float(i), noise]), torch.tensor(i % 3)


@pytest.mark.slow
def test_workers_fetch_what_the_sampler_orders_from_rngs_seeded_by_seed_epoch_and_worker() -> None:
    task = classification("noisy", NoisyDataset(), NoisyDataset(), (2,), 3)

    def epoch(workers: int, seed: int, e: int) -> list[torch.Tensor]:
        cfg = make_config("data.batch_size=4", f"data.num_workers={workers}").data
        return [x for x, _ in train_batches(task, cfg, seed, e, 0, frozenset())]

    before = torch.get_rng_state()
    two = epoch(2, 1, 1)
    assert torch.equal(torch.get_rng_state(), before)  # the loader drew its worker seeds from its own generator
    order = [b[:, 0].long().tolist() for b in two]
    assert order == batches_of(EpochBatches(24, 4, True, 1, 1))  # the sampler decides the order, not the workers
    assert all(torch.equal(a, b) for a, b in zip(two, epoch(2, 1, 1), strict=True))  # the same draws again
    assert not torch.equal(two[0][:, 1], epoch(2, 1, 2)[0][:, 1])  # another epoch: other worker seeds
    assert [b[:, 0].tolist() for b in epoch(0, 1, 1)] == [b[:, 0].tolist() for b in two]


def test_validation_is_batched_and_in_its_own_order() -> None:
    task = build_task(make_config(*SYNTHETIC))
    cfg = make_config("data.eval_batch_size=50").data
    got = list(val_batches(task, cfg))
    assert [len(y) for _, y in got] == [50, 50, 28]
    x, y = fetch(task.val, range(len(task.val)))  # type: ignore[arg-type]
    assert torch.equal(torch.cat([b for b, _ in got]), x) and torch.equal(torch.cat([t for _, t in got]), y)


# ------------------------------------------------------------------------------------------ built-in tasks


def test_digits_and_digits_images_are_the_same_samples_in_two_shapes() -> None:
    flat, images = build_task(make_config("data.task=digits")), build_task(make_config("data.task=digits_images"))
    assert (flat.input_shape, images.input_shape) == ((64,), (1, 8, 8))
    assert (len(flat.train), len(flat.val), flat.n_outputs) == (1348, 449, 10)
    xf, yf = fetch(flat.train, range(10))
    xi, yi = fetch(images.train, range(10))
    assert xi.shape == (10, 1, 8, 8) and torch.equal(xi.flatten(1), xf) and torch.equal(yi, yf)
    assert flat.describe() == {"name": "digits", "primary_metric": "val_accuracy", "direction": "max",
                               "metrics": ["val_loss", "val_accuracy"]}


class _Explodes:
    def __init__(self, what: str) -> None:
        self.what = what

    def __call__(self, *a: object, **k: object) -> None:
        raise AssertionError(f"{self.what} must never be called")


def test_mnist1d_is_generated_locally_deterministically_and_leaves_no_trace(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mnist1d.data
    import requests

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(requests, "get", _Explodes("requests.get (a download)"))
    monkeypatch.setattr(mnist1d.data, "get_dataset", _Explodes("mnist1d.data.get_dataset (download/pickle)"))
    monkeypatch.setattr(mnist1d.data, "from_pickle", _Explodes("mnist1d.data.from_pickle"))
    mnist1d_arrays.cache_clear()
    np.random.seed(123)
    random.seed(123)
    np_before, py_before = np.random.get_state(), random.getstate()
    a = build_task(make_config("data.task=mnist1d", "run.seed=1"))
    assert random.getstate() == py_before
    np_after = np.random.get_state()
    assert all(np.array_equal(u, v) for u, v in zip(np_before, np_after, strict=True))  # global RNGs untouched
    assert list(tmp_path.iterdir()) == []  # nothing written (no pickle cache)
    b = build_task(make_config("data.task=mnist1d", "run.seed=99"))
    assert (a.input_shape, a.n_outputs, len(a.train), len(a.val)) == ((1, 40), 10, 4000, 1000)
    xa, ya = fetch(a.train, range(4000))
    xb, yb = fetch(b.train, range(4000))
    assert xa.dtype == torch.float32 and torch.equal(xa, xb) and torch.equal(ya, yb)  # any run seed: same data
    assert sorted(set(ya.tolist())) == list(range(10))
    # the package's generator with its default arguments, as a user would call it
    ref = mnist1d.data.make_dataset(mnist1d.data.get_dataset_args())
    assert torch.equal(xa[:, 0].double(), torch.tensor(ref["x"]).float().double())
    assert torch.equal(fetch(a.val, range(1000))[1], torch.tensor(ref["y_test"]))


# -------------------------------------------------------------------------------------------- user tasks


def test_a_dataset_pair_is_a_classification_task_with_classes_from_the_labels() -> None:
    task = build_task(make_config("data.task=plugins_fixture:make_data"))
    assert (task.input_shape, task.n_outputs, task.primary_metric, task.direction) == ((5,), 3, "val_accuracy",
                                                                                        "max")
    named = build_task(make_config("data.task=plugins_fixture:make_named_data"))
    assert named.n_outputs == 7  # len(train_ds.classes), torchvision's convention


@pytest.mark.parametrize(("factory", "needles"), [
    ("not_a_dataset", ["dict", "Task", "(train_ds, val_ds)"]),
    ("pair_of_lists", ["train_ds is list", "map-style"]),
    ("float_labels", ["torch.float32", "integer class ids"]),
    ("wrong_input_shape", ["[5]", "[7]", "input_shape"]),
    ("unknown_primary", ["'r2'", "mae"]),
])
def test_a_factory_returning_the_wrong_types_is_a_config_error_naming_the_key(factory: str,
                                                                              needles: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        build_task(make_config(f"data.task=plugins_fixture:{factory}"))
    message = str(info.value)
    assert message.startswith(f"data.task = 'plugins_fixture:{factory}'")
    assert all(n in message for n in needles), message


def test_a_bad_task_factory_exits_3_at_build_with_its_message_intact(tmp_path: Path) -> None:
    result = train(tmp_path / "run", *FAST, "data.task=plugins_fixture:wrong_input_shape", extra=["--json"])
    assert result.exit_code == ExitCode.CONFIG, out(result)
    doc = json.loads(result.stdout)  # the --json error document: refused before the run has a directory
    assert doc["key"] == "data.task" and "[5]" in doc["error"] and "[7]" in doc["error"]
    assert not (tmp_path / "run").exists()
    human = train(tmp_path / "run2", *FAST, "data.task=plugins_fixture:wrong_input_shape")
    assert human.exit_code == ExitCode.CONFIG
    assert "inputs have shape [5], Task.input_shape says [7]" in human.output  # Rich ate no bracketed text


@pytest.mark.slow
def test_a_user_task_that_is_not_classification_trains_on_its_own_loss_and_metric(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = train(run, *FAST, "data.task=plugins_fixture:make_regression", "trainer.epochs=3",
                   "controller.plateau_min_delta=1.0", "controller.warmup_epochs=0", "seeds.min_training_epochs=1")
    assert result.exit_code == 0, out(result)
    rows = metrics(run)
    assert {"train_loss", "train_mae", "val_loss", "val_mae"} <= set(rows[0]) and "val_accuracy" not in rows[0]
    assert rows[-1]["val_mae"] < rows[0]["val_mae"]  # it learns
    s = summary(run)
    assert s["task"] == {"name": "regression", "primary_metric": "val_mae", "direction": "min",
                         "metrics": ["val_loss", "val_mae"]}
    assert set(s["final"]) == {"val_loss", "val_mae", "params"} and s["final"]["val_mae"] == rows[-1]["val_mae"]
    started = events(run, "run.started")[0]["attributes"]
    assert started["task"] == s["task"] and started["epochs"] == 3 and started["steps_per_epoch"] == 2
    germinated = [e for e in events(run, "command.accepted") if e["attributes"]["command"]["kind"] == "germinate"]
    assert germinated  # the controller observed the task's metrics and grew a seed (its G1 probe used MSE)


@pytest.mark.slow
def test_the_mlp_host_takes_image_inputs_flattened(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = train(run, *UNHURRIED, "controller.isolation=inline", "data.task=digits_images", "trainer.epochs=1")
    assert result.exit_code == 0, out(result)
    row = metrics(run)[0]
    assert row["global_step"] == 1348 // 64 and row["params"] == 64 * 6 + 6 + 6 * 6 + 6 + 6 * 10 + 10


@pytest.mark.slow
def test_a_run_with_worker_processes_trains_bit_identically_to_one_without(tmp_path: Path) -> None:
    runs = {}
    for workers in (0, 2):
        run = tmp_path / f"workers-{workers}"
        result = train(run, *FAST, "trainer.epochs=2", "controller.plateau_min_delta=1.0",
                       "controller.warmup_epochs=0", f"data.num_workers={workers}")
        assert result.exit_code == 0, out(result)
        runs[workers] = run
    for stem in ("model", "optimizer", "rng"):
        assert_same_tensors(tensors(latest(runs[0]), stem), tensors(latest(runs[2]), stem))
    assert metrics_without_wall_clock(runs[0]) == metrics_without_wall_clock(runs[2])
