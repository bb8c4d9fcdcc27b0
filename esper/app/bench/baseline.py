"""The plain-PyTorch baselines the bench measures Esper against, as real code (not a program in a string).

The same host, seeds, data and optimizer come from Esper's own builders; only the loop is hand-written, as a
user of plain PyTorch would write it. ``python -m esper.app.bench.baseline --config FILE --epochs N`` is the
plain training process whose peak memory the MEM row compares with ``esper train``'s.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from esper.app.bench.stats import BenchError, BenchUnsupported
from esper.core import config as config_mod
from esper.core.data import Task, build_task, train_batches, val_batches
from esper.core.model.host import CNNHost, MLPHost, build_host
from esper.core.model.optim import ParamGroupSpec, build_optimizer
from esper.core.model.transformer import TransformerHost


class PlainNet(nn.Module):
    """The same host and seed modules with the same math as ``Kasmina.forward`` + ``seed_passes``, written as one
    plain forward over the host's own blocks (no hooks): ``stem`` -> blocks -> ``tail``, read from the host.

    The BLENDING seed reads the detached activation of its layer and is mixed in with ``alpha``; the TRAINING
    seed's own path substitutes its output at its layer and runs the rest of the host on it (the host is not
    trained by that path). Both paths share the host prefix computed once. The mixing expressions are the ones
    ``kasmina.blending.blend`` evaluates, operation for operation, so both sides compute the same floats.
    """

    def __init__(self, host: nn.Module, blend_layer: str, blend_seed: nn.Module, train_layer: str,
                 train_seed: nn.Module, blend_mode: str) -> None:
        super().__init__()
        if blend_mode not in ("convex", "residual"):
            raise BenchUnsupported(f"P-1 baseline implements the convex and residual blends, not {blend_mode!r}",
                                   key="seeds.blend.mode")
        self.host = host
        self.blocks = host_blocks(host)
        names = [name for name, _ in self.blocks]
        for layer in (blend_layer, train_layer):
            if layer not in names:
                raise BenchUnsupported(f"P-1's plain baseline puts seeds on the host's blocks {names}, not on "
                                       f"{layer!r}", key="seeds.slots")
        self.blend_seed = blend_seed
        self.train_seed = train_seed
        self.blend_layer = blend_layer
        self.train_layer = train_layer
        self.blend_mode = blend_mode
        self.alpha = 0.0

    def _mix(self, h: torch.Tensor, s: torch.Tensor, a: float, base: torch.Tensor) -> torch.Tensor:
        if self.blend_mode == "convex":
            return (1 - a) * h + a * s
        return h + a * (s - base)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """The host's input to its first block."""
        host = self.host
        if isinstance(host, TransformerHost):
            return host.drop(host.tok_emb(x) + host.pos_emb(torch.arange(x.shape[1], device=x.device)))
        return x.flatten(1) if isinstance(host, MLPHost) else x

    def tail(self, h: torch.Tensor) -> torch.Tensor:
        """The host's output given its last block's output."""
        host = self.host
        if isinstance(host, TransformerHost):
            return host.head(host.ln_f(h))
        head: nn.Module = host.head
        return head(h)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The host's output with the BLENDING seed mixed in, and the TRAINING seed's own path's output."""
        h = self.stem(x)
        seed_h: torch.Tensor | None = None
        a = min(max(self.alpha, 0.0), 1.0)
        for name, block in self.blocks:
            h = block(h)
            if seed_h is not None:
                seed_h = block(seed_h)
            if name == self.blend_layer:
                base = h.detach()
                h = self._mix(h, self.blend_seed(base), a, base)
                if seed_h is not None:
                    base = seed_h.detach()
                    seed_h = self._mix(seed_h, self.blend_seed(base), a, base)
            if name == self.train_layer:
                base = h.detach()
                seed_h = self._mix(base, self.train_seed(base), 1.0, base)
        assert seed_h is not None  # __init__ checked the layer is a block
        return self.tail(h), self.tail(seed_h)


def host_blocks(host: nn.Module) -> list[tuple[str, nn.Module]]:
    """The built-in host's blocks in forward order (where slots sit); another host is not supported by P-1."""
    if isinstance(host, TransformerHost):
        prefix, depth = "block", host.depth
    elif isinstance(host, MLPHost | CNNHost):
        prefix, depth = host.prefix, host.depth
    else:
        raise BenchUnsupported(f"P-1's plain baseline is written for the built-in hosts (mlp, cnn, transformer), "
                               f"not {type(host).__name__}", key="host.factory")
    return [(f"{prefix}{i}", getattr(host, f"{prefix}{i}")) for i in range(1, depth + 1)]


class PlainLoop:
    """A hand-written training loop over :class:`PlainNet`, as a user of plain PyTorch would write it: the same
    optimizer groups, LR schedule (a pure function of the step, like a ``LambdaLR``), alpha ramp, clipping and
    per-step metrics as Esper's ``train_step``, without its safety checks or telemetry."""

    def __init__(self, net: PlainNet, opt: torch.optim.Optimizer, task: Task, cfg: config_mod.EsperConfig,
                 lr_factor: Callable[[int], float], blend_steps: int, *, global_step: int = 0,
                 alpha_step: int = 0) -> None:
        self.net, self.opt, self.task, self.cfg = net, opt, task, cfg
        self.lr_factor = lr_factor
        self.blend_steps = blend_steps
        self.global_step = global_step
        self.alpha_step = alpha_step
        self.train_params = list(net.train_seed.parameters())
        self.all_params = [p for g in opt.param_groups for p in g["params"]]
        self.base_lr = cfg.trainer.lr
        self.grad_clip = cfg.trainer.grad_clip

    def step(self, x: torch.Tensor, y: torch.Tensor, backward: Callable[[torch.Tensor], None] | None = None,
             opt: Any = None) -> float:
        """One optimizer step; returns the loss. A Lightning module passes its ``manual_backward`` and its
        wrapped optimizer (``self.optimizers()``); the math is the same."""
        net, task = self.net, self.task
        opt = self.opt if opt is None else opt
        opt.zero_grad(set_to_none=True)
        net.alpha = 1.0 if self.alpha_step >= self.blend_steps else self.alpha_step / self.blend_steps
        logits, seed_logits = net(x)
        loss = task.loss(logits, y)
        value = loss.item()
        if backward is None:
            loss.backward()
        else:
            backward(loss)
        seed_loss = task.loss(seed_logits, y)
        for p, g in zip(self.train_params, torch.autograd.grad(seed_loss, self.train_params), strict=True):
            p.grad = g
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.all_params, self.grad_clip)
        lr = self.base_lr * self.lr_factor(self.global_step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        opt.step()
        self.global_step += 1
        self.alpha_step += 1
        with torch.no_grad():  # the task's metrics, as the trainer records them per step
            for fn in task.metrics.values():
                float(fn(logits, y))
        return value

    def round(self, first_epoch: int, epochs: int, max_steps: int = 0) -> float:
        """ms per step over ``epochs`` data epochs from ``first_epoch`` (at most ``max_steps`` when > 0)."""
        steps, loss_sum = 0, 0.0
        t0 = time.perf_counter()
        for e in range(epochs):
            for x, y in epoch_batches(self.task, self.cfg, first_epoch + e):
                loss_sum += self.step(x, y)
                steps += 1
                if steps == max_steps:
                    break
            if steps == max_steps:
                break
        dt = time.perf_counter() - t0
        if not loss_sum == loss_sum:  # NaN: the figures would be of a broken loop
            raise BenchError("plain P-1 loop produced a NaN loss")
        return dt * 1000.0 / steps


def epoch_batches(task: Task, cfg: config_mod.EsperConfig, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One whole epoch of training batches, exactly as the trainer reads them (the same DataLoader)."""
    return iter(train_batches(task, cfg.data, cfg.run.seed, epoch, 0, frozenset()))


def train_plain(cfg: config_mod.EsperConfig, epochs: int) -> float:
    """The configured host trained on the configured task by a plain loop; returns the last validation loss."""
    task = build_task(cfg)
    model = build_host(cfg, task.input_shape, task.n_outputs)
    opt = build_optimizer(cfg.trainer, [ParamGroupSpec("host", list(model.parameters()))])
    val = float("nan")
    for epoch in range(1, epochs + 1):
        for x, y in epoch_batches(task, cfg, epoch):
            opt.zero_grad(set_to_none=True)
            task.loss(model(x), y).backward()
            opt.step()
        with torch.no_grad():
            total, seen = 0.0, 0
            for x, y in val_batches(task, cfg.data):
                total += float(task.loss(model(x), y)) * len(y)
                seen += len(y)
            val = total / seen
    return val


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m esper.app.bench.baseline", description=__doc__)
    parser.add_argument("--config", required=True, help="resolved config file (TOML)")
    parser.add_argument("--epochs", type=int, required=True)
    args = parser.parse_args(argv)
    cfg = config_mod.load(Path(args.config)).config
    print(json.dumps({"val_loss": train_plain(cfg, args.epochs)}))


if __name__ == "__main__":
    main()
