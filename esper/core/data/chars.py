"""The ``chars`` task: a character-level language model of the Python language reference every CPython ships
(``pydoc_data.topics``, about 465 kB of text, 103 distinct characters).

The topics are joined in sorted-key order; the first 90 % of the characters train, the last 10 % validate
(the same split whatever the run seed). Each split is cut into non-overlapping windows of ``data.block_size``
characters: the input is a window, the target the same window shifted by one character, so a sample is
``x [T]`` and ``y [T]`` (int64 ids) and the model outputs logits ``[N, T, V]``. The loss is the mean
per-character cross-entropy (nats); metrics: ``bpc`` (bits per character, the loss over ln 2; primary,
lower is better) and ``accuracy`` (next-character accuracy).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from esper.core.config import EsperConfig
from esper.core.data.task import Task, TensorPairs

VAL_FRACTION = 0.1


@functools.cache
def _text() -> str:
    from pydoc_data.topics import topics  # stdlib: the text ships with every CPython

    return "".join(topics[k] for k in sorted(topics))


def _per_token(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # float32 whatever the autocast dtype: a bf16 log-softmax over 103 symbols loses the bits being measured
    return F.cross_entropy(output.float().flatten(0, -2), target.to(output.device).flatten())


def lm_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean next-character cross-entropy in nats, logits ``[N, T, V]`` against ids ``[N, T]``."""
    return _per_token(output, target)


def bits_per_char(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return _per_token(output.detach(), target) / math.log(2)


def next_char_accuracy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output.detach().argmax(dim=-1) == target.to(output.device)).float().mean()


def _windows(ids: torch.Tensor, block: int) -> TensorPairs:
    n = (len(ids) - 1) // block
    idx = torch.arange(n)[:, None] * block + torch.arange(block + 1)[None, :]
    w = ids[idx]
    return TensorPairs(w[:, :-1].contiguous(), w[:, 1:].contiguous())


def chars_task(cfg: EsperConfig) -> Task:
    text = _text()
    vocab = sorted(set(text))
    stoi = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([stoi[c] for c in text], dtype=torch.int64)
    n_train = int(len(ids) * (1 - VAL_FRACTION))
    block = cfg.data.block_size
    return Task("chars", _windows(ids[:n_train], block), _windows(ids[n_train:], block), (block,), len(vocab),
                lm_loss, {"bpc": bits_per_char, "accuracy": next_char_accuracy}, primary="bpc", direction="min")
