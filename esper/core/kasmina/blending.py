"""Blend modes (T-4): one parser for the blend config, one pure function per mode."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from esper.core.config import BlendConfig
from esper.core.errors import EsperError


class BlendError(EsperError):
    """Blend inputs are inconsistent with the configured mode."""


@dataclass(frozen=True)
class BlendSpec:
    """A validated blend configuration (the only form Kasmina and the controller use)."""

    mode: str
    steps: int
    channel_alpha: tuple[float, ...] = ()
    confidence_margin: float = 0.5

    @property
    def needs_logits(self) -> bool:
        return self.mode == "confidence"


def parse_blend(cfg: BlendConfig | dict[str, object]) -> BlendSpec:
    """Validate a blend config (pydantic model or plain dict)."""
    model = cfg if isinstance(cfg, BlendConfig) else BlendConfig.model_validate(cfg)
    if model.mode == "channel":
        if not model.channel_alpha:
            raise BlendError("blend mode 'channel' requires channel_alpha (a per-channel vector)")
        if any(not 0.0 <= a <= 1.0 for a in model.channel_alpha):
            raise BlendError(f"channel_alpha values must lie in [0, 1], got {model.channel_alpha}")
    return BlendSpec(model.mode, model.steps, tuple(model.channel_alpha), model.confidence_margin)


def alpha_at(step: int, steps: int) -> float:
    """Linear ramp that reaches exactly 1.0 at ``step == steps`` (no float drift)."""
    if step >= steps:
        return 1.0
    return max(0.0, step / steps)


def blend(
    host: torch.Tensor,
    seed: torch.Tensor,
    alpha: float | torch.Tensor,
    spec: BlendSpec,
    logits: torch.Tensor | None = None,
    *,
    channel_axis: int = -1,
    seed_input: torch.Tensor | None = None,
) -> torch.Tensor:
    """Combine the host activation with the seed output. Never mutates ``alpha`` or its inputs.

    ``channel_axis`` is where the activation's channels are (1 for ``[N, C, ...]``, -1 for ``[N, ..., D]``);
    ``seed_input`` is the tensor the seed was given (``residual`` adds only the seed's change to it): the
    detached host activation until the seed is FOSSILIZED, the host activation itself after.
    """
    if seed.shape != host.shape:
        raise BlendError(f"seed output shape {tuple(seed.shape)} != host activation {tuple(host.shape)}")
    if isinstance(alpha, torch.Tensor):
        a: float | torch.Tensor = alpha.to(dtype=host.dtype, device=host.device).clamp(0.0, 1.0)  # out of place
    else:
        a = min(max(float(alpha), 0.0), 1.0)  # a float needs no tensor (this runs every step)
    if spec.mode == "convex":
        return (1 - a) * host + a * seed
    if spec.mode == "residual":
        # the seed returns x + delta(x) for its input x: add delta only, so the host's own path keeps its gradient
        # whole (subtracting the detached host from a seed fed the live one would count that path twice)
        base = host.detach() if seed_input is None else seed_input
        return host + a * (seed - base)
    if spec.mode == "channel":
        if not spec.channel_alpha:
            raise BlendError("blend mode 'channel' requires a per-channel alpha vector")
        w = a * _channel_vector(spec, host, channel_axis)
        return (1 - w) * host + w * seed
    if spec.mode == "confidence":
        w = a * _confidence_gate(spec, host, logits)
        return (1 - w) * host + w * seed
    raise BlendError(f"unknown blend mode {spec.mode!r}")


def _channel_vector(spec: BlendSpec, host: torch.Tensor, channel_axis: int) -> torch.Tensor:
    n_channels = host.shape[channel_axis]
    if len(spec.channel_alpha) != n_channels:
        raise BlendError(f"channel_alpha has {len(spec.channel_alpha)} entries, activation "
                         f"{list(host.shape)} has {n_channels} channels on axis {channel_axis}")
    view = [1] * host.dim()
    view[channel_axis] = n_channels
    return torch.tensor(spec.channel_alpha, dtype=host.dtype, device=host.device).view(view)


def _confidence_gate(spec: BlendSpec, host: torch.Tensor, logits: torch.Tensor | None) -> torch.Tensor:
    if logits is None:
        raise BlendError("blend mode 'confidence' needs the host's class logits [N, C]; none were given")
    if logits.dim() != 2 or logits.shape[0] != host.shape[0] or logits.shape[1] < 2:
        raise BlendError(f"confidence logits must be [N, C>=2] with N={host.shape[0]}, got {tuple(logits.shape)}")
    top2 = logits.detach().topk(2, dim=1).values
    margin = top2[:, 0] - top2[:, 1]
    # trust the seed where the host is unsure (small margin); one gate per sample, over its whole activation
    return (1 - (margin / spec.confidence_margin).clamp(0.0, 1.0)).view(-1, *[1] * (host.dim() - 1))


def blend_weights(host: torch.Tensor, alpha: float, spec: BlendSpec, logits: torch.Tensor | None = None, *,
                  channel_axis: int = -1) -> torch.Tensor | None:
    """The seed's weight per channel (``channel``) or per sample (``confidence``) at ``alpha`` -- what
    :func:`blend` multiplies the seed by; ``None`` for the modes with one scalar weight (convex, residual)."""
    if spec.mode not in ("channel", "confidence"):
        return None  # every step: no autograd context to enter for the scalar modes
    with torch.no_grad():
        if spec.mode == "channel":
            return (alpha * _channel_vector(spec, host, channel_axis)).flatten()
        if spec.mode == "confidence":
            return (alpha * _confidence_gate(spec, host, logits)).flatten()
    return None


def gate_sparsity(weights: torch.Tensor, eps: float = 1e-3) -> float:
    """Fraction of blend weights that are effectively zero (telemetry)."""
    return float((weights.abs() < eps).float().mean())
