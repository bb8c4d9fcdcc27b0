"""Issue 15: checkpoint.async: the state is copied into reused CPU buffers and written on a background thread
through the same atomic writer; its outcome comes back on the caller's thread. (SIGKILL during an async write and
the CRITICAL failure path on real training are in test_crash_safety.py.)"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from esper.core import checkpoint as ck
from esper.core.checkpoint.background import BackgroundWriter
from esper.core.checkpoint.write import CheckpointWriteError
from esper.core.config import from_dict
from esper.core.tolaria.checkpointer import Checkpointer, RunConfigRecord
from esper.core.tolaria.train_state import Position


def _state() -> dict[str, dict[str, torch.Tensor]]:
    return {"model": {"w": torch.randn(512, 1024), "b": torch.randn(7)},
            "optimizer": {"m": torch.zeros(512, 1024)}}


def test_staging_reuses_its_buffers_and_is_a_copy(tmp_path: Path) -> None:
    state = _state()
    bw = BackgroundWriter()
    first = bw.stage(state)
    ptrs = {(s, k): t.data_ptr() for s, g in first.items() for k, t in g.items()}
    assert all(first[s][k].data_ptr() != state[s][k].data_ptr() for s, k in ptrs)
    expected = state["model"]["w"].clone()
    bw.submit(tmp_path, "epoch-0001", first, {"epoch": 1}, keep_last=2)
    state["model"]["w"].add_(1.0)  # the loop trains on while the write runs
    outcome = bw.wait()
    assert outcome is not None and outcome.error is None and outcome.path == tmp_path / "epoch-0001"
    loaded = ck.load_checkpoint(tmp_path)
    assert torch.equal(loaded.tensors["model"]["w"], expected)  # what was staged, not what the loop did after
    assert loaded.payload == {"epoch": 1}
    second = bw.stage(state)
    assert {(s, k): t.data_ptr() for s, g in second.items() for k, t in g.items()} == ptrs  # preallocated
    assert torch.equal(second["model"]["w"], state["model"]["w"])
    assert bw.wait() is None  # nothing in flight


def test_a_changed_shape_gets_a_new_buffer_and_a_gone_tensor_drops_its_own(tmp_path: Path) -> None:
    bw = BackgroundWriter()
    bw.stage({"model": {"w": torch.ones(3), "x": torch.ones(2)}})
    staged = bw.stage({"model": {"w": torch.ones(4, dtype=torch.float64)}})
    assert staged["model"]["w"].shape == (4,) and staged["model"]["w"].dtype == torch.float64
    assert set(bw._buffers) == {("model", "w")}


def test_a_failed_background_write_comes_back_as_its_error_and_keeps_latest(tmp_path: Path) -> None:
    bw = BackgroundWriter()
    bw.submit(tmp_path, "epoch-0001", bw.stage(_state()), {"epoch": 1}, keep_last=2)
    assert bw.wait().error is None  # type: ignore[union-attr]

    def disk_full(_tmp: Path) -> None:
        raise OSError(28, "No space left on device")

    bw.submit(tmp_path, "epoch-0002", bw.stage(_state()), {"epoch": 2}, keep_last=2, before_commit=disk_full)
    outcome = bw.wait()
    assert outcome is not None and isinstance(outcome.error, CheckpointWriteError) and outcome.path is None
    assert ck.latest_checkpoint(tmp_path) == tmp_path / "epoch-0001" and ck.verify_checkpoint(tmp_path).ok
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0001", "latest"]


def test_one_write_in_flight_at_a_time(tmp_path: Path) -> None:
    bw = BackgroundWriter()
    release = threading.Event()  # the write stays in flight until the test has asked everything
    bw.submit(tmp_path, "epoch-0001", bw.stage(_state()), {"epoch": 1}, keep_last=2,
              before_commit=lambda _t: release.wait())
    assert bw.pending
    with pytest.raises(RuntimeError, match="in flight"):
        bw.stage(_state())
    with pytest.raises(RuntimeError, match="in flight"):
        bw.submit(tmp_path, "epoch-0002", {}, {}, keep_last=2)
    assert bw.pending and ck.latest_checkpoint(tmp_path) is None  # refused, and the first write not yet committed
    release.set()
    assert bw.wait().path is not None  # type: ignore[union-attr]
    assert not bw.pending and not bw.running


def test_the_async_key_is_in_the_schema_with_its_toml_name() -> None:
    from esper.core.config import CheckpointConfig, EsperConfig
    c = CheckpointConfig.model_validate({"async": True})
    assert c.async_ is True and c.model_dump()["async"] is True
    assert "async" in EsperConfig().to_toml()
    assert CheckpointConfig.model_fields["async_"].description
    with pytest.raises(ValueError, match="async_"):
        CheckpointConfig.model_validate({"async_": True})  # the TOML key is `async`


class _Faults:
    """A commit held open until released: the write is still in flight when the loop asks for ``latest``."""

    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()

    def before_commit(self, _tmp: Path) -> None:
        self.entered.set()
        self.release.wait()

    def after_write(self, _path: Path) -> None:
        pass


def _checkpointer(tmp_path: Path, events: list[tuple[str, str]]) -> Checkpointer:
    cfg = from_dict({"checkpoint": {"async": True, "keep_last": 1}})
    return Checkpointer(cfg.checkpoint, tmp_path, "run", None, None, None, _Faults(),  # type: ignore[arg-type]
                        lambda _src, event, level, **_kw: events.append((event, level)),
                        config=RunConfigRecord.of(cfg), max_failures=cfg.emergency.max_checkpoint_failures)


def _submit(cp: Checkpointer, tmp_path: Path, name: str, before_commit: Callable[[Path], None]) -> None:
    assert cp.background is not None
    cp.background.submit(tmp_path, name, cp.background.stage(_state()), {"epoch": 1}, keep_last=1,
                         before_commit=before_commit)
    cp._pending = ("periodic", Position(1, 0, 10))


def test_a_full_rollback_reads_latest_only_once_the_write_in_flight_has_ended(tmp_path: Path) -> None:
    events: list[tuple[str, str]] = []
    cp = _checkpointer(tmp_path, events)
    held = _Faults()
    _submit(cp, tmp_path, "epoch-0001", held.before_commit)
    assert held.entered.wait(60) and ck.latest_checkpoint(tmp_path) is None
    # released only once the commit is held: a `committed()` that did not wait for it would likely answer None
    threading.Thread(target=held.release.set).start()
    # what the rollback's full tier asks: with keep_last = 1 the write's pruning would race a read of the old one
    assert cp.committed() == tmp_path / "epoch-0001"
    assert cp.background is not None and not cp.background.pending
    assert events == [("checkpoint.written", "INFO")]


def test_a_failed_background_write_is_critical_and_its_signal_reaches_the_loop(tmp_path: Path) -> None:
    events: list[tuple[str, str]] = []
    cp = _checkpointer(tmp_path, events)

    def disk_full(_tmp: Path) -> None:
        raise OSError(28, "No space left on device")

    _submit(cp, tmp_path, "epoch-0001", disk_full)
    assert cp.committed() is None  # settled: nothing committed, the signal kept for the loop
    assert events == [("checkpoint.failed", "CRITICAL")] and cp.failures == 1
    signal = cp.poll()
    assert signal is not None and signal.level == "NOTICE" and signal.cause == "checkpoint_write_error"
    assert cp.poll() is None
