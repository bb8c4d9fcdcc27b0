"""Issue 15: checkpoint.async: the state is copied into reused CPU buffers and written on a background thread
through the same atomic writer; its outcome comes back on the caller's thread. (SIGKILL during an async write and
the CRITICAL failure path on real training are in test_crash_safety.py.)"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from esper.core import checkpoint as ck
from esper.core.checkpoint.background import BackgroundWriter
from esper.core.checkpoint.write import CheckpointWriteError


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
    bw.submit(tmp_path, "epoch-0001", bw.stage(_state()), {"epoch": 1}, keep_last=2,
              before_commit=lambda _t: time.sleep(0.2))
    assert bw.pending
    with pytest.raises(RuntimeError, match="in flight"):
        bw.stage(_state())
    with pytest.raises(RuntimeError, match="in flight"):
        bw.submit(tmp_path, "epoch-0002", {}, {}, keep_last=2)
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
