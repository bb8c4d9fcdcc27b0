"""The plain-PyTorch baselines the bench measures Esper against, as real code (not a program in a string).

The same host, seeds, data and optimizer come from Esper's own builders; only the loop is hand-written, as a
user of plain PyTorch would write it. ``python -m esper.core.bench.baseline --config FILE --epochs N`` is the
plain training process whose peak memory the MEM row compares with ``esper train``'s.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from esper.core import config as config_mod
from esper.core.bench.stats import BenchError, BenchUnsupported
from esper.core.data import Dataset, batches, build_dataset
from esper.core.host import MLPHost, build_host
from esper.core.optim import ParamGroupSpec, build_optimizer


class PlainNet(nn.Module):
    """The same host and seed modules with the same math, written as one plain forward.

    The BLENDING seed reads the detached activation of its layer and is mixed in with ``alpha``; the TRAINING
    seed's own path substitutes its output at its layer and runs the rest of the host on it (the host is not
    trained by that path). Both paths share the host prefix computed once.
    """

    def __init__(self, host: MLPHost, blend_layer: str, blend_seed: nn.Module, train_layer: str,
                 train_seed: nn.Module, blend_mode: str) -> None:
        super().__init__()
        if blend_mode not in ("convex", "residual"):
            raise BenchUnsupported(f"P-1 baseline implements the convex and residual blends, not {blend_mode!r}")
        self.host = host
        self.blend_seed = blend_seed
        self.train_seed = train_seed
        self.blend_layer = blend_layer
        self.train_layer = train_layer
        self.blend_mode = blend_mode
        self.alpha = 0.0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x
        seed_h: torch.Tensor | None = None
        for i in range(1, self.host.depth + 1):
            name = f"hidden{i}"
            layer = getattr(self.host, name)
            h = layer(h)
            if seed_h is not None:
                seed_h = layer(seed_h)
            if name == self.blend_layer:
                s = self.blend_seed(h.detach())
                if self.blend_mode == "convex":
                    h = (1.0 - self.alpha) * h + self.alpha * s
                else:
                    h = h + self.alpha * (s - h.detach())
                if seed_h is not None:
                    s2 = self.blend_seed(seed_h)
                    seed_h = (1.0 - self.alpha) * seed_h + self.alpha * s2 if self.blend_mode == "convex" else (
                        seed_h + self.alpha * (s2 - seed_h))
            if name == self.train_layer:
                seed_h = self.train_seed(h.detach())
        if seed_h is None:
            raise BenchError(f"layer {self.train_layer!r} is not a hidden layer of the host")
        return self.host.head(h), self.host.head(seed_h)




def p1_round(net: PlainNet, opt: torch.optim.Optimizer, data: Dataset, batch_size: int, seed: int,
             first_epoch: int, epochs: int, blend_steps: int, grad_clip: float) -> float:
    """ms per step of a hand-written loop over the same batches Esper's P-1 round trains on."""
    train_params = list(net.train_seed.parameters())
    all_params = [p for g in opt.param_groups for p in g["params"]]
    steps, loss_sum, correct, step = 0, 0.0, 0, 0
    t0 = time.perf_counter()
    for e in range(epochs):
        for x, y in batches(data, batch_size, seed, first_epoch + e):
            opt.zero_grad(set_to_none=True)
            net.alpha = min(1.0, step / blend_steps)
            logits, seed_logits = net(x)
            loss = F.cross_entropy(logits, y)
            loss_sum += loss.item()
            loss.backward()
            seed_loss = F.cross_entropy(seed_logits, y)
            for p, g in zip(train_params, torch.autograd.grad(seed_loss, train_params), strict=True):
                p.grad = g
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(all_params, grad_clip)
            opt.step()
            correct += int((logits.detach().argmax(dim=1) == y).sum())
            steps += 1
            step += 1
    dt = time.perf_counter() - t0
    if not loss_sum == loss_sum:  # NaN: the figures would be of a broken loop
        raise BenchError("plain P-1 loop produced a NaN loss")
    return dt * 1000.0 / steps


def train_plain(cfg: config_mod.EsperConfig, epochs: int) -> float:
    """The configured host trained on the configured task by a plain loop; returns the last validation loss."""
    data = build_dataset(cfg)
    model = build_host(cfg, tuple(data.x_train.shape[1:]), data.n_classes)
    opt = build_optimizer(cfg.trainer, [ParamGroupSpec("host", list(model.parameters()))])
    val = float("nan")
    for epoch in range(1, epochs + 1):
        for x, y in batches(data, cfg.data.batch_size, cfg.run.seed, epoch):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        with torch.no_grad():
            val = float(F.cross_entropy(model(data.x_val), data.y_val))
    return val


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m esper.core.bench.baseline", description=__doc__)
    parser.add_argument("--config", required=True, help="resolved config file (TOML)")
    parser.add_argument("--epochs", type=int, required=True)
    args = parser.parse_args(argv)
    cfg = config_mod.load(Path(args.config)).config
    print(json.dumps({"val_loss": train_plain(cfg, args.epochs)}))


if __name__ == "__main__":
    main()
