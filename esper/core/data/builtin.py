"""The built-in tasks (H-4) and user task factories (``data.task = "module:function"``).

- ``mnist1d``: MNIST-1D (Greydanus, "Scaling down deep learning"), from the ``mnist1d`` package's procedural
  generator with its default arguments (4,000 train / 1,000 validation sequences of length 40, 10 classes),
  inputs ``[1, 40]`` (channels first). The same arrays whatever the run seed; never downloaded or unpickled.
- ``digits``: scikit-learn's 1,797 handwritten 8x8 digits, flat ``[64]``; ``digits_images``: the same, ``[1, 8, 8]``.
- ``synthetic``: labels from a random non-linear teacher, so extra capacity helps (fast tests).
- ``chars``: a character-level language model of CPython's ``pydoc_data.topics`` (``esper.core.data.chars``).

digits, digits_images and synthetic hold out ``data.val_fraction`` by a permutation of the run seed.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

from esper.core.config import EsperConfig
from esper.core.config.plugins import call_factory, load_factory
from esper.core.data.chars import chars_task
from esper.core.data.task import Task, TensorPairs, classification, fetch
from esper.core.errors import ConfigError, EsperError
from esper.core.model import rng

KEY = "data.task"


def build_task(cfg: EsperConfig) -> Task:
    """The configured task, checked: a factory returning the wrong types is a ConfigError naming ``data.task``."""
    try:
        return _build(cfg)
    except ConfigError as exc:
        exc.key = exc.key or KEY  # every check here is about data.task (the --json error document's key)
        raise


def _build(cfg: EsperConfig) -> Task:
    name = cfg.data.task
    if name == "mnist1d":
        task = _mnist1d()
    elif name in ("digits", "digits_images"):
        from sklearn.datasets import load_digits  # 0.85 s of imports: paid by the digits tasks alone

        bunch = load_digits()
        x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
        shape = (64,) if name == "digits" else (1, 8, 8)
        task = _split(name, x.reshape(-1, *shape), torch.tensor(bunch.target, dtype=torch.int64), 10, cfg)
    elif name == "synthetic":
        task = _synthetic(cfg)
    elif name == "chars":
        task = chars_task(cfg)
    else:
        task = _from_factory(name, call_factory(load_factory(name, KEY), name, KEY, cfg))
    check_task(task, name)
    return task


def _split(name: str, x: torch.Tensor, y: torch.Tensor, n_classes: int, cfg: EsperConfig) -> Task:
    gen = torch.Generator().manual_seed(cfg.run.seed)
    order = torch.randperm(len(x), generator=gen)
    n_val = max(1, int(round(len(x) * cfg.data.val_fraction)))
    val, train = order[:n_val], order[n_val:]
    return classification(name, TensorPairs(x[train].contiguous(), y[train].contiguous()),
                          TensorPairs(x[val].contiguous(), y[val].contiguous()), tuple(x.shape[1:]), n_classes)


def _synthetic(cfg: EsperConfig) -> Task:
    d = cfg.data
    gen = torch.Generator().manual_seed(rng.derive(cfg.run.seed, 7919))
    x = torch.randn(d.synthetic_samples, d.synthetic_features, generator=gen)
    w1 = torch.randn(d.synthetic_features, 32, generator=gen)
    w2 = torch.randn(32, d.synthetic_classes, generator=gen)
    y = (torch.tanh(x @ w1) @ w2).argmax(dim=1)
    return _split("synthetic", x, y, d.synthetic_classes, cfg)


@functools.cache
def mnist1d_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MNIST-1D from the package's generator with its default arguments, generated once per process.

    ``make_dataset`` seeds numpy's and Python's global RNGs (``set_seed``): both are saved and restored around
    it, so generating the data leaves no trace on the run."""
    from mnist1d.data import get_dataset_args, make_dataset  # the generator only: never get_dataset (downloads)

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    arrays = (d["x"], d["y"], d["x_test"], d["y_test"])
    for a in arrays:
        a.setflags(write=False)  # shared by every run of this process
    return arrays


def _mnist1d() -> Task:
    x, y, x_val, y_val = mnist1d_arrays()

    def inputs(a: np.ndarray) -> torch.Tensor:
        return torch.tensor(a, dtype=torch.float32).unsqueeze(1)  # [N, 1, 40]: a Conv1d takes it as it is

    return classification("mnist1d", TensorPairs(inputs(x), torch.tensor(y, dtype=torch.int64)),
                          TensorPairs(inputs(x_val), torch.tensor(y_val, dtype=torch.int64)),
                          (1, int(x.shape[1])), 10)


# ------------------------------------------------------------------------------------------------- factories
def _from_factory(ref: str, made: Any) -> Task:
    """A factory's result: a Task, or ``(train_ds, val_ds)`` made a classification task (cross-entropy)."""
    if isinstance(made, Task):
        return made
    if isinstance(made, tuple) and len(made) == 2:
        train, val = made
        _check_dataset(train, "train_ds", ref)
        _check_dataset(val, "val_ds", ref)
        x, _ = _sample(train, "train_ds", ref)
        try:
            n = _n_classes(train, val, ref)
        except EsperError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's dataset failing a read at build is that key's problem
            raise ConfigError(f"{KEY} = {ref!r}: the dataset raised {type(exc).__name__} while Esper read its labels "
                              f"to count the classes: {exc} (give the train dataset a `classes` list to skip the "
                              "scan)") from exc
        return classification(ref, train, val, tuple(x.shape[1:]), n)
    raise ConfigError(f"{KEY} = {ref!r}: factory returned {_typename(made)}, expected a Task or a "
                      "(train_ds, val_ds) pair of torch.utils.data.Dataset")


def _typename(v: Any) -> str:
    if isinstance(v, tuple):
        return f"tuple({', '.join(type(e).__name__ for e in v)})"
    return type(v).__name__


def _check_dataset(ds: Any, what: str, ref: str) -> None:
    if not isinstance(ds, Dataset) or isinstance(ds, IterableDataset) or not hasattr(ds, "__len__"):
        raise ConfigError(f"{KEY} = {ref!r}: {what} is {type(ds).__name__}, expected a map-style "
                          "torch.utils.data.Dataset (with __len__ and __getitem__)")
    if len(ds) == 0:
        raise ConfigError(f"{KEY} = {ref!r}: {what} is empty")


def _sample(ds: Dataset[Any], what: str, ref: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The first two samples as one batch; a dataset that cannot give them is the config's problem."""
    try:
        x, y = fetch(ds, range(min(2, len(ds))))  # type: ignore[arg-type]
    except EsperError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's dataset, however it fails, is that key's problem (exit 3)
        raise ConfigError(f"{KEY} = {ref!r}: {what} does not give (x, y) tensor pairs: "
                          f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise ConfigError(f"{KEY} = {ref!r}: {what} samples are ({type(x).__name__}, {type(y).__name__}), "
                          "expected (Tensor, Tensor)")
    return x, y


def _n_classes(train: Dataset[Any], val: Dataset[Any], ref: str) -> int:
    """``len(train_ds.classes)`` when the dataset names its classes (torchvision's convention), else one more
    than the largest label of either set (one pass over the labels)."""
    classes = getattr(train, "classes", None)
    if isinstance(classes, Sequence) and not isinstance(classes, str) and classes:
        return len(classes)
    top = -1
    for ds, what in ((train, "train_ds"), (val, "val_ds")):
        for start in range(0, len(ds), 4096):  # type: ignore[arg-type]
            _, y = fetch(ds, range(start, min(start + 4096, len(ds))))  # type: ignore[arg-type]
            if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32, torch.int16,
                                                                   torch.uint8) or y.dim() != 1:
                raise ConfigError(f"{KEY} = {ref!r}: {what} labels are {_describe(y)}, expected integer class "
                                  "ids (one per sample) for a classification task; return a Task for any other")
            if len(y) and int(y.min()) < 0:
                raise ConfigError(f"{KEY} = {ref!r}: {what} has a negative class id {int(y.min())}")
            top = max(top, int(y.max()) if len(y) else -1)
    return top + 1


def _describe(y: Any) -> str:
    if isinstance(y, torch.Tensor):
        return f"{y.dtype} of shape {list(y.shape)}"
    return type(y).__name__


# ------------------------------------------------------------------------------------------------ checking
def check_task(task: Task, ref: str) -> None:
    """Every field of a task has the type the loop relies on, and its datasets give what it declares."""
    def bad(what: str) -> ConfigError:
        return ConfigError(f"{KEY} = {ref!r}: {what}")

    for ds, what in ((task.train, "train"), (task.val, "val")):
        _check_dataset(ds, f"Task.{what}", ref)
    shape = task.input_shape
    if not isinstance(shape, tuple) or not shape or not all(isinstance(d, int) and d > 0 for d in shape):
        raise bad(f"Task.input_shape is {shape!r}, expected a tuple of positive ints")
    if not isinstance(task.n_outputs, int) or isinstance(task.n_outputs, bool) or task.n_outputs < 1:
        raise bad(f"Task.n_outputs is {task.n_outputs!r}, expected an int >= 1")
    if not callable(task.loss):
        raise bad(f"Task.loss is {type(task.loss).__name__}, expected a callable (output, target) -> Tensor")
    for name, fn in task.metrics.items():
        if not isinstance(name, str) or not name.isidentifier() or name == "loss" or not callable(fn):
            raise bad(f"Task.metrics[{name!r}] must be a callable under an identifier other than 'loss'")
    if task.primary != "loss" and task.primary not in task.metrics:
        raise bad(f"Task.primary is {task.primary!r}, expected 'loss' or one of {sorted(task.metrics)}")
    if task.direction not in ("max", "min"):
        raise bad(f"Task.direction is {task.direction!r}, expected 'max' or 'min'")
    for ds, what in ((task.train, "train"), (task.val, "val")):
        x, y = _sample(ds, f"Task.{what}", ref)
        if tuple(x.shape[1:]) != shape:
            raise bad(f"Task.{what} inputs have shape {list(x.shape[1:])}, Task.input_shape says {list(shape)}")
        if len(y) != len(x):
            raise bad(f"Task.{what} gives {len(x)} inputs but {len(y)} targets for {len(x)} samples")
