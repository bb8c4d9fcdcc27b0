"""Seeds never change host state except through their blended output (issue 23, Deliver 1).

While a seed is in TRAINING, Esper runs extra forwards through the host (the seed's own pass, the G1 probe, the
isolation probe). On every built-in host, on a BatchNorm host and on hosts with dropout, the host's parameters
*and buffers* (BatchNorm statistics, ``num_batches_tracked``) must be bit-identical at every epoch end to the same
run in which no seed germinates, and so must every figure the run records.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import UNHURRIED, assert_same_tensors, events, metrics_without_wall_clock, out, summary, tensors, train
from torch import nn

from esper.core.errors import ConfigError
from esper.core.kasmina.sandbox import untouched

SLOTS = "seeds.slots=[{{name='s1', layer='{0}'}}, {{name='s2', layer='{1}'}}]"
CONV = ["seeds.blueprints=['conv_block']", "seeds.blend.mode='residual'", SLOTS.format("conv1", "conv2")]
CNN = ["data.task=mnist1d", "data.batch_size=400", "host.factory=cnn", "host.channels=[4, 4]", "host.kernels=[5, 3]",
       *CONV]
HOSTS: dict[str, list[str]] = {
    "mlp": ["data.task=synthetic", "host.factory=mlp"],
    "cnn1d": CNN,
    "cnn2d": ["data.task=digits_images", "data.batch_size=256", "host.factory=cnn", "host.channels=[4, 4]",
              "host.kernels=[3, 3]", "host.stride=1", *CONV],
    "cnn-batchnorm": [*CNN, "host.norm='batch'"],
    "cnn-groupnorm-dropout": [*CNN, "host.norm='group'", "host.dropout=0.3"],
    "transformer-dropout": ["data.task=chars", "data.batch_size=512", "data.block_size=16",
                            "host.factory=transformer", "host.n_layers=2",
                            "host.d_model=16", "host.n_heads=2", "host.dropout=0.2",
                            "seeds.blueprints=['block']", "seeds.param_budget=100000",
                            "seeds.slots=[{name='s1', layer='block1', kind='tokens'}, "
                            "{name='s2', layer='block2', kind='tokens'}]"],
}
# germinate at the first decision and stay in TRAINING (G2 is never reached); a checkpoint every epoch
IN_TRAINING = [*UNHURRIED, "controller.plateau_min_delta=1.0", "controller.warmup_epochs=0",
               "controller.plateau_window=1", "seeds.min_training_epochs=100", "controller.isolation=inline",
               "checkpoint.keep_last=10", "checkpoint.every_epochs=1", "trainer.epochs=4"]
NEVER = ["controller.warmup_epochs=1000"]  # the same run, but the controller never germinates


# what differs because a seed exists at all (its own passes cost FLOPs: the compute, not the host, changes)
SEED_FIELDS = ("params", "seeds_by_stage", "commands", "flops", "flops_validation")


def host_figures(run: Path) -> list[dict[str, object]]:
    return [{k: v for k, v in row.items() if k not in SEED_FIELDS} for row in metrics_without_wall_clock(run)]


def host_state(ckpt: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors(ckpt, "model").items() if k.startswith("host.")}


@pytest.mark.slow
@pytest.mark.parametrize("host", list(HOSTS))
def test_host_parameters_and_buffers_are_untouched_by_a_training_seed(host: str, tmp_path: Path) -> None:
    grown, alone = tmp_path / "grown", tmp_path / "alone"
    r = train(grown, *HOSTS[host], *IN_TRAINING)
    assert r.exit_code == 0, out(r)
    r = train(alone, *HOSTS[host], *IN_TRAINING, *NEVER)
    assert r.exit_code == 0, out(r)
    stages = [s["stage"] for s in summary(grown)["seeds"]]
    assert "TRAINING" in stages, stages
    assert [s["stage"] for s in summary(alone)["seeds"]] == ["DORMANT", "DORMANT"]
    g1 = [e["attributes"] for e in events(grown, "gate.result") if e["attributes"]["gate"] == "G1"]
    assert g1 and all(a["passed"] for a in g1), g1
    if host == "cnn-batchnorm":  # the probe's forwards moved BatchNorm statistics, and Esper put them back
        assert all(a["attributes"]["buffers_restored"] > 0 for a in g1), g1
    for epoch in range(1, 5):
        name = f"epoch-{epoch:04d}"
        state = host_state(grown / "checkpoints" / name)
        if host == "cnn-batchnorm":
            assert any(k.endswith("running_mean") for k in state) and any(k.endswith("num_batches_tracked")
                                                                           for k in state)
        assert_same_tensors(state, host_state(alone / "checkpoints" / name))
    # the seed trained on its own pass only: what the run measured of the host is the host-alone run's
    assert host_figures(grown) == host_figures(alone)


class _Counting(nn.Module):
    """A host whose forward moves a buffer, draws from the RNG, and (when asked) grows a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(3)
        self.register_buffer("calls", torch.zeros(1))
        self.grow = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.grow:
            self.calls = torch.zeros(2)
        return nn.functional.dropout(self.bn(x), 0.5, training=True)


def test_untouched_puts_back_buffers_in_place_and_the_rng_and_names_what_moved() -> None:
    host = _Counting()
    running = host.bn.running_mean
    torch.manual_seed(0)
    expected_draw = torch.rand(1)
    torch.manual_seed(0)
    with untouched(host) as restored:
        host(torch.randn(8, 3))
    assert host.bn.running_mean is running and torch.equal(running, torch.zeros(3))
    assert float(host.calls) == 0.0 and int(host.bn.num_batches_tracked) == 0
    assert sorted(restored.moved) == ["bn.num_batches_tracked", "bn.running_mean", "bn.running_var", "calls"]
    assert torch.equal(torch.rand(1), expected_draw)  # the forward's randn and dropout draws were undone


def test_a_host_whose_buffer_changes_shape_is_named() -> None:
    host = _Counting()
    host.grow = True
    with pytest.raises(ConfigError, match="buffer 'calls' changed from \\[1\\]"), untouched(host):
        host(torch.randn(8, 3))
