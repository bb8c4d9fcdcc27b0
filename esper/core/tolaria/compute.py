"""What a run has cost (issue 24): training FLOPs per phase and training wall time, accumulated as steps run.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on the real modules during the real step, once per
*layout* (the input shape and every slot's stage and seed) and phase; the count is cached and added for every later
step of the same layout, so counting costs one slower step per architecture change, never a second forward.
Counted, as the growth papers count them: matrix multiplies, convolutions and attention (forward and backward,
two FLOPs per multiply-add). Not counted: elementwise work, normalisation, reductions, the optimizer update, and
the gates' probes (G1's isolation probe, the counterfactual evaluations are counted as validation). An operator
that may be expensive but has no formula (a custom op outside ``aten``/``prims``, or an ``aten`` matmul-, conv- or
attention-class op torch cannot count) is listed in ``uncounted_ops`` with its call count: never a silent zero.

Phases: ``forward`` (the host with every blended seed, and the loss), ``backward``, ``seeds`` (each TRAINING seed's
own forward and backward), ``validation`` (every validation pass, the counterfactual ones included). Training
FLOPs are the first three. Under data parallel each rank counts its own share and the figure is multiplied by the
world size (every rank runs the same layout on the same per-rank batch). A rollback keeps the totals: the compute
of the steps it undid was spent. A resume continues from the checkpoint's totals.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_backward_flop_count, sdpa_flop_count

TRAINING_PHASES = ("forward", "backward", "seeds")
COUNTED = ("training FLOPs: matmul, convolution and attention (torch.utils.flop_counter), forward and backward, the "
           "seeds' own passes included; not elementwise work, normalisation or the optimizer update")
PHASES = (*TRAINING_PHASES, "validation")
_ATEN = torch.ops.aten

def _conv_backward(grad_out: Any, x: Any, w: Any, bias: Any, stride: Any, padding: Any, dilation: Any,
                   transposed: bool, output_padding: Any, groups: int, output_mask: Any, out_val: Any = None) -> int:
    """torch's formula counts a grouped convolution's input gradient as if it were not grouped (``groups`` times
    too many: a depthwise conv's backward came out at 25x its forward); each gradient costs what the forward does."""
    if groups == 1 or transposed:
        return int(flop_registry[_ATEN.convolution_backward](grad_out, x, w, bias, stride, padding, dilation,
                                                              transposed, output_padding, groups, output_mask,
                                                              out_val=out_val))
    forward = 2 * grad_out.shape[0] * math.prod(grad_out.shape[2:]) * w.shape[0] * math.prod(w.shape[1:])
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


_conv_backward._get_raw = True  # type: ignore[attr-defined]  # tensors in: it hands them on to torch's formula

# CPU attention kernels torch's table lacks: the same formula as the flash kernels (query, key, value shapes
# first); grouped convolutions' backward, which the table over-counts
_CUSTOM = {
    _ATEN._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *_a, out_shape=None, **_k: sdpa_flop_count(q, k, v),
    _ATEN._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda g, q, k, v, *_a, out_shape=None, **_k: sdpa_backward_flop_count(g, q, k, v),
    _ATEN.convolution_backward: _conv_backward,
}
_COUNTED = frozenset({*flop_registry, *_CUSTOM})
# aten families whose cost grows faster than their output's size: one torch cannot count must be named
_HEAVY = re.compile(r"mm|matmul|conv|attention|einsum|linalg|fft|cdist|cholesky|triangular|lstm|gru|rnn|"
                    r"embedding_bag|tensordot|kron")


def _uncountable(packet: Any) -> bool:
    namespace = str(packet._qualified_op_name).split("::", 1)[0]
    if packet in _COUNTED:
        return False
    if namespace not in ("aten", "prims"):
        return True  # a custom operator: its cost is unknown
    return bool(_HEAVY.search(str(packet).split(".", 1)[-1]))


class _Census(TorchDispatchMode):
    """Every operator the counted region dispatched that the FLOP table cannot count and may be expensive."""

    def __init__(self) -> None:
        super().__init__()
        self.uncounted: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        packet = func._overloadpacket
        if _uncountable(packet):
            self.uncounted[str(packet)] += 1
        return func(*args, **(kwargs or {}))


class ComputeMeter:
    """Cumulative FLOPs per phase, training wall seconds and the uncounted operators: a Stateful part (manifest
    key ``compute``; a rollback keeps it)."""

    # a checkpoint written before compute accounting: nothing was counted
    ABSENT: dict[str, Any] = {"flops": {}, "train_seconds": 0.0, "uncounted_ops": {}}

    def __init__(self, world_size: int = 1) -> None:
        self.world_size = world_size
        self.flops: Counter[str] = Counter()
        self.train_seconds = 0.0
        self.uncounted: Counter[str] = Counter()
        self._cache: dict[tuple[str, Hashable], int] = {}

    @contextmanager
    def phase(self, name: str, layout: Hashable) -> Iterator[None]:
        """Count the FLOPs of the block for ``name``: measured the first time ``layout`` runs it, then the cached
        figure. A block that raises counts nothing (and caches nothing: it did not run whole)."""
        cached = self._cache.get((name, layout))
        if cached is None:
            census = _Census()
            with FlopCounterMode(display=False, custom_mapping=_CUSTOM) as counter, census:
                yield
            cached = self._cache[(name, layout)] = int(counter.get_total_flops())
            # seen once per layout: the census says which operators a cached figure leaves out
            self.uncounted.update(census.uncounted)
        else:
            yield
        self.flops[name] += cached * self.world_size

    def add_step_time(self, ms: float) -> None:
        self.train_seconds += ms / 1000.0

    @property
    def train_flops(self) -> int:
        return sum(self.flops[p] for p in TRAINING_PHASES)

    def row(self) -> dict[str, Any]:
        """The cumulative figures every metrics row carries."""
        return {"flops": self.train_flops, "flops_validation": self.flops["validation"],
                "step_seconds": round(self.train_seconds, 3)}

    def describe(self) -> dict[str, Any]:
        """The summary's ``compute``."""
        return {**self.row(), "by_phase": {p: self.flops[p] for p in PHASES},
                "uncounted_ops": dict(sorted(self.uncounted.items())),
                "counted": COUNTED}

    # ---------------------------------------------------------------- Stateful
    def state_dict(self) -> dict[str, Any]:
        return {"flops": {p: self.flops[p] for p in PHASES if self.flops[p]}, "train_seconds": self.train_seconds,
                "uncounted_ops": dict(self.uncounted)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.flops = Counter({str(k): int(v) for k, v in state["flops"].items()})
        self.train_seconds = float(state["train_seconds"])
        self.uncounted = Counter({str(k): int(v) for k, v in state["uncounted_ops"].items()})


def layout_key(x: torch.Tensor, training: bool, slots: Any, extra: Hashable = None) -> Hashable:
    """What decides a step's FLOPs: the batch's shape, train or eval mode, and each slot's stage and seed."""
    return (tuple(x.shape), training, tuple((s.name, s.stage, s.seed_id) for s in slots), extra)
