"""Seeds that start from what the host has learned (issue 24): a copy of the trained layer the slot follows.

``zeroed`` (LLaMA-Pro's block expansion): the copy with its residual branches' output projections zeroed (in a
ResNet block, which has none, its last normalization's scale and shift), so at birth the seed is the identity on
the slot's activation (checked on a real activation, never assumed). ``exact``
(G_stack / MIDAS stacking): the copy as it is, so at alpha 1 the network runs the trained layer twice; blending
ramps it in from alpha 0, so the switch is smooth either way.

Only a layer whose output has its input's shape can be copied into its own slot (a transformer block, a residual
stage); anything else is refused with the reason, at germination (G0) and in ``esper layers``.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
from torch import nn

# the output projection of a residual branch, as the common codebases name it: nanoGPT and Esper (attn.proj,
# mlp.proj), GPT-2 (c_proj), LLaMA and Mistral (o_proj, down_proj), torch.nn.MultiheadAttention (out_proj)
OUTPUT_PROJECTION = re.compile(r"(^|\.)(proj|c_proj|o_proj|out_proj|down_proj)\.(weight|bias)$")
HOW = ("zeroed", "exact")
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
          "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
          "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


class InheritError(ValueError):
    """The slot's layer cannot be copied into a seed (the reason is G0's)."""


def copy_layer(layer: nn.Module, how: str, activation: torch.Tensor) -> nn.Module:
    """A copy of ``layer`` (its current weights; no hooks, no shared tensors) as a seed for the slot after it;
    ``activation``: a real activation at the slot, to check that the copy maps it to its own shape (and, for
    ``zeroed``, to itself)."""
    if how not in HOW:
        raise InheritError(f"unknown inheritance {how!r}: {', '.join(HOW)}")
    # the hooks stay on the host's layer (the slot's own hook holds the run's machinery): the copy gets empty ones
    memo: dict[int, Any] = {}
    for m in layer.modules():
        for name in _HOOKS:
            hooks = getattr(m, name, None)
            if hooks is not None:
                memo[id(hooks)] = type(hooks)()
    seed = copy.deepcopy(layer, memo)
    for p in seed.parameters():
        p.requires_grad_(True)
    if how == "zeroed":
        _zero_residual_outputs(seed, type(layer).__name__)
    was = seed.training
    seed.eval()  # the check must not draw dropout masks or move running statistics
    try:
        with torch.no_grad():
            out = seed(activation)
    except Exception as exc:  # noqa: BLE001 - a layer that cannot take its own output is refused, with the reason
        raise InheritError(f"{type(layer).__name__} cannot take its own output {tuple(activation.shape)}: "
                           f"{type(exc).__name__}: {exc}") from exc
    finally:
        seed.train(was)
    if not isinstance(out, torch.Tensor) or out.shape != activation.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InheritError(f"{type(layer).__name__} maps {tuple(activation.shape)} to {got}: only a layer whose "
                           f"output has its input's shape can be copied after itself")
    if how == "zeroed" and not torch.equal(out, activation):
        raise InheritError(f"{type(layer).__name__} with its residual outputs zeroed is not the identity "
                           f"(largest change {float((out - activation).abs().max()):.3g}): it is not a residual "
                           f"block; use the exact copy")
    return seed


_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm)


def _zero_residual_outputs(seed: nn.Module, kind: str) -> None:
    """Zero what ends each residual branch: the output projections by name (transformer blocks) or, in a block
    that has none, its last normalization's scale and shift (a ResNet block: zero-init-residual). The caller
    checks the result is the identity on a real activation, so a wrong guess is refused, never trained."""
    named = [p for name, p in seed.named_parameters() if OUTPUT_PROJECTION.search(name)]
    if not named:
        norms = [m for m in seed.modules() if isinstance(m, _NORMS) and getattr(m, "weight", None) is not None]
        if not norms:
            raise InheritError(f"{kind} has no output projection to zero (parameters named like attn.proj, c_proj, "
                               f"o_proj, out_proj or down_proj) and no normalization with a scale ending a "
                               f"residual branch: use the exact copy")
        last = norms[-1]
        named = [last.weight] + ([last.bias] if last.bias is not None else [])
    with torch.no_grad():
        for p in named:
            p.zero_()
