"""User plug-ins named as ``plugins_fixture:function`` by the trainer tests (pytest puts tests/ on sys.path)."""

from __future__ import annotations

import torch
from torch import nn

from esper.core.config import ControllerConfig, EsperConfig, SeedsConfig
from esper.core.data import Dataset
from esper.core.tamiyo import ControllerState, Observation, Proposal

N_FEATURES = 5
N_CLASSES = 3
TRUNK_WIDTH = 6


def make_data(cfg: EsperConfig) -> Dataset:
    """A tiny separable task: the label is the argmax of three fixed projections."""
    gen = torch.Generator().manual_seed(cfg.run.seed)
    x = torch.randn(96, N_FEATURES, generator=gen)
    y = (x @ torch.randn(N_FEATURES, N_CLASSES, generator=gen)).argmax(dim=1)
    return Dataset("plugin", x[:64], y[:64], x[64:], y[64:], N_CLASSES)


def not_a_dataset(cfg: EsperConfig) -> dict[str, int]:
    return {"x": 1}


class TrunkHost(nn.Module):
    """A host whose only slot-able layer is called ``trunk`` (not the MLP's hidden1..N)."""

    def __init__(self, n_features: int, n_classes: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(n_features, TRUNK_WIDTH), nn.Tanh())
        self.out = nn.Linear(TRUNK_WIDTH, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.trunk(x))


def make_host(cfg: EsperConfig, n_features: int, n_classes: int) -> nn.Module:
    torch.manual_seed(cfg.run.seed)
    return TrunkHost(n_features, n_classes)


def not_a_module(cfg: EsperConfig, n_features: int, n_classes: int) -> str:
    return "host"


class _Scale(nn.Module):
    """x * (1 + s), s zero-initialised: the identity at germination."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1 + self.s)


def make_blueprint(width: int) -> nn.Module:
    return _Scale(width)


def not_a_blueprint(width: int) -> list[int]:
    return [width]


class FossilizeDormant:
    """A policy that always asks to fossilize ``s1`` whatever its stage (illegal from DORMANT)."""

    def decide(self, obs: Observation, state: ControllerState) -> list[Proposal]:
        return [Proposal("fossilize", "s1", None, "test: fossilize a dormant slot", "test")]


def fossilize_dormant(controller: ControllerConfig, seeds: SeedsConfig) -> FossilizeDormant:
    return FossilizeDormant()


class _Dead(nn.Module):
    """Its parameter reaches the output only multiplied by zero: finite but all-zero gradients."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.0 * self.p


def dead_blueprint(width: int) -> nn.Module:
    return _Dead(width)


def raising_task(cfg: EsperConfig) -> Dataset:
    """A task factory that raises (a missing data file, a bug): exit 3 naming the key, never a traceback."""
    raise FileNotFoundError("train.csv: no such file")
