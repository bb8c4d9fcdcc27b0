"""P-1's baselines compute what Esper computes: the plain loop and the Lightning peer against ``train_step``, bit
for bit, on every built-in host kind; the realistic-host row (P-1/cnn) and the skipped rows. Speed is never
asserted."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import SHIPPED, UNHURRIED, make_config
from rich.console import Console

from esper.app.bench import p1l
from esper.app.bench.baseline import PlainLoop, host_blocks
from esper.app.bench.p1 import P1Setup, host_row_config, plain_side, run_p1_host, setup_p1
from esper.app.bench.stats import BenchPlan, BenchUnsupported, Comparison, Skipped
from esper.cli.bench import results_table
from esper.core import config as config_mod
from esper.core.config import BenchConfig, EsperConfig
from esper.core.data import build_task, train_batches
from esper.core.errors import ConfigError
from esper.core.model.host import build_host
from esper.core.tolaria import EpochStats
from esper.core.tolaria.emergency import _total_norm

HAS_LIGHTNING = importlib.util.find_spec("lightning") is not None
QUICK = BenchPlan.from_config(BenchConfig(warmup=0, repeats=1), quick=True)

# Seeds reach BLENDING in few epochs; the three built-in host kinds, each on a task it takes.
FAST = [*UNHURRIED, "controller.isolation=\"inline\"", "seeds.min_training_epochs=1", "seeds.g2_min_improvement=0.0"]
HOSTS = {
    "cnn": [],  # the shipped config: mnist1d on the cnn host, residual blend
    "mlp": ['host.factory="mlp"', "host.hidden=[8, 8]", 'seeds.blueprints=["residual_mlp"]',
            'seeds.slots=[{name="s1", layer="hidden1"}, {name="s2", layer="hidden2"}]', 'seeds.blend.mode="convex"'],
    "transformer": ['data.task="chars"', "data.block_size=8", "data.batch_size=16", 'host.factory="transformer"',
                    "host.d_model=16", "host.n_heads=2", "host.n_layers=2", 'seeds.blueprints=["attention"]',
                    'seeds.slots=[{name="s1", layer="block1", kind="tokens"}, '
                    '{name="s2", layer="block2", kind="tokens"}]', "seeds.param_budget=100000"],
}


def _config(tmp: Path, *extra: str) -> EsperConfig:
    return config_mod.load(SHIPPED, [f'run.output_dir="{tmp}"', *FAST, *extra]).config


@pytest.fixture(scope="module")
def cnn_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[P1Setup]:
    tmp = tmp_path_factory.mktemp("p1")
    s = setup_p1(_config(tmp), tmp)
    yield s
    s.close()


def _params(s: P1Setup) -> list[torch.Tensor]:
    slots = s.parts.kasmina.slots
    return [*s.parts.host.parameters(), *slots[s.blend_slot].params(), *slots[s.train_slot].params()]


def _plain_params(loop: PlainLoop) -> list[torch.Tensor]:
    net = loop.net
    return [*net.host.parameters(), *net.blend_seed.parameters(), *net.train_seed.parameters()]


def _same_steps(s: P1Setup, loop: PlainLoop, steps: int) -> None:
    """Esper's train_step and the plain loop on the same batches: the same losses and parameters, bit for bit."""
    p = s.parts
    stats = EpochStats()
    training = [sl for sl in p.kasmina.slots.values() if sl.stage == "TRAINING"]
    assert [sl.stage for sl in p.kasmina.slots.values()] == ["BLENDING", "TRAINING"]
    before = [t.clone() for t in _params(s)]
    for i, (x, y) in enumerate(train_batches(p.task, s.cfg.data, s.cfg.run.seed, 700, 0, frozenset())):
        if i == steps:
            break
        seen = stats.loss_sum
        assert s.step(x, y, stats, training)
        esper_loss = (stats.loss_sum - seen) / len(y)
        assert loop.step(x, y) == pytest.approx(esper_loss, rel=1e-12, abs=0.0)
    mine, theirs = _params(s), _plain_params(loop)
    assert len(mine) == len(theirs)
    assert all(torch.equal(a, b) for a, b in zip(mine, theirs, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(mine, before, strict=True))  # the steps did train
    assert loop.global_step == p.state.global_step


@pytest.mark.parametrize("host", ["cnn", "mlp", pytest.param("transformer", marks=pytest.mark.slow)])
def test_the_plain_loop_computes_what_train_step_computes(host: str, tmp_path: Path) -> None:
    s = setup_p1(_config(tmp_path, *HOSTS[host]), tmp_path)
    try:
        loop = s.plain
        assert loop.net.blend_mode == s.cfg.seeds.blend.mode
        assert loop.alpha_step == s.parts.kasmina.slots[s.blend_slot].stats.alpha_step
        _same_steps(s, loop, 3)
    finally:
        s.close()


def test_the_plain_side_owns_its_optimizer_state(cnn_setup: P1Setup) -> None:
    # loading the trainer's optimizer state must copy it: shared moment buffers would be stepped by both sides
    loop = plain_side(cnn_setup.cfg, cnn_setup.parts)
    esper_state = cnn_setup.parts.optimizer.optimizer.state
    mine = {id(t) for st in esper_state.values() for t in st.values() if isinstance(t, torch.Tensor)}
    theirs = {id(t) for st in loop.opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)}
    assert theirs and not mine & theirs
    assert {id(q) for q in _plain_params(loop)}.isdisjoint({id(q) for q in _params(cnn_setup)})


@pytest.mark.skipif(not HAS_LIGHTNING, reason="needs the bench extra (lightning); dev installs it")
def test_the_lightning_peer_computes_what_the_plain_loop_computes(cnn_setup: P1Setup) -> None:
    from esper.app.bench import lightning_peer

    s = cnn_setup
    plain, peer = plain_side(s.cfg, s.parts), lightning_peer.PeerModule(plain_side(s.cfg, s.parts))
    ms = lightning_peer.lightning_round(peer, s.cfg.run.seed, 800, 1)
    assert ms > 0 and peer.steps == s.parts.steps_per_epoch
    for x, y in train_batches(s.parts.task, s.cfg.data, s.cfg.run.seed, 800, 0, frozenset()):
        plain.step(x, y)
    assert peer.loop.global_step == plain.global_step
    assert all(torch.equal(a, b) for a, b in zip(_plain_params(peer.loop), _plain_params(plain), strict=True))


@pytest.mark.skipif(not HAS_LIGHTNING, reason="needs the bench extra (lightning); dev installs it")
def test_p1l_is_a_ratio_against_lightning(cnn_setup: P1Setup) -> None:
    r = p1l.run_p1l(cnn_setup, QUICK)
    assert isinstance(r, Comparison) and r.id == "P-1L" and r.goal_ratio is None
    assert len(r.baseline) == len(r.esper) == 1 and r.baseline[0] > 0 and r.esper[0] > 0
    assert r.extra["lightning"] and "lightning.Trainer" in r.baseline_label


def test_p1l_without_lightning_is_skipped_with_its_reason(cnn_setup: P1Setup,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(p1l.importlib.util, "find_spec", lambda name, *a: None if name == "lightning" else real(
        name, *a))
    r = p1l.run_p1l(cnn_setup, QUICK)
    assert isinstance(r, Skipped) and r.id == "P-1L" and "lightning" in r.reason and "[bench]" in r.reason
    doc = r.to_dict()
    assert doc["kind"] == "skipped" and doc["met"] is None and doc["goal"] is None
    console = Console(width=220, record=True)
    console.print(results_table({"quick": True, "results": [doc], "machine": {
        "cores_available": 2, "torch": "x", "torch_threads": 1, "python": "3.11.7"}}))
    assert "skipped: the lightning package is not installed" in console.export_text()


def test_the_realistic_host_row_has_a_million_parameters_on_the_shipped_task() -> None:
    cfg = config_mod.load(SHIPPED).config
    plan = BenchPlan.from_config(cfg.bench, quick=False)
    row = host_row_config(cfg, plan)
    task = build_task(row)
    host = build_host(row, task.input_shape, task.n_outputs)
    assert row.host.factory == "cnn" and row.host.channels == cfg.bench.p1_host_channels
    assert sum(q.numel() for q in host.parameters()) >= 1_000_000
    assert cfg.host.channels != row.host.channels  # the run's own config is untouched


def test_p1_cnn_runs_on_the_configured_host(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "bench.p1_host_channels=[16, 16, 16]", "bench.p1_host_kernels=[5, 3, 3]")
    plan = BenchPlan.from_config(cfg.bench, quick=False)
    plan = BenchPlan(**{**plan.__dict__, "warmup": 0, "repeats": 1, "p1_host_steps": 2})
    r = run_p1_host(cfg, plan, tmp_path)
    assert isinstance(r, Comparison) and r.id == "P-1/cnn" and r.goal_ratio == 1.05
    # conv1 (1->16, k5) + conv2/conv3 (16->16, k3) + head (16 x 5 -> 10), each with biases
    assert r.size["host_params"] == (16 * 5 + 16) + 2 * (16 * 16 * 3 + 16) + (16 * 5 * 10 + 10)
    assert r.size["steps_per_round"] == 2 and r.size["seed_stages"] == {"s1": "BLENDING", "s2": "TRAINING"}


def test_p1_cnn_on_another_host_is_skipped_with_its_reason(tmp_path: Path) -> None:
    cfg = make_config(f'run.output_dir="{tmp_path}"')  # the built-in defaults: digits on the mlp host
    r = run_p1_host(cfg, BenchPlan.from_config(cfg.bench, quick=True), tmp_path)
    assert isinstance(r, Skipped) and r.id == "P-1/cnn" and "host.factory is 'mlp'" in r.reason
    assert not list(tmp_path.iterdir())  # nothing was built


def test_p1_host_keys_must_pair_up() -> None:
    with pytest.raises(ConfigError, match="p1_host_kernels needs one kernel per entry"):
        make_config("bench.p1_host_channels=[8, 8]", "bench.p1_host_kernels=[3]")
    assert make_config("bench.p1_host_channels=[]", "bench.p1_host_kernels=[]").bench.p1_host_channels == []


def test_a_host_the_plain_side_is_not_written_for_is_unsupported_naming_the_key() -> None:
    with pytest.raises(BenchUnsupported) as info:
        host_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    assert info.value.key == "host.factory" and "Sequential" in str(info.value)


@pytest.mark.parametrize("grads", [
    [torch.randn(6, 5), torch.randn(6), torch.randn(10, 30)],
    [torch.randn(3), torch.tensor([1.0, math.inf])],
    [torch.randn(3), torch.tensor([math.nan])],
    [torch.full((4,), 3e38), torch.full((4,), 3e38)],  # every entry finite, the norm overflows
    [torch.randn(3), torch.randn(3, dtype=torch.float64)],  # mixed dtypes: the library path
])
def test_the_gradient_check_norm_is_the_library_norm(grads: list[torch.Tensor]) -> None:
    mine, lib = _total_norm(grads), torch.nn.utils.get_total_norm(grads)
    assert mine.dtype == lib.dtype
    assert torch.equal(mine, lib) or (mine.isnan() and lib.isnan())
