"""The ``transformer`` host: a small GPT-style decoder in the spirit of nanoGPT, and the layers the ``block`` and
``attention`` seed blueprints reuse.

``tok_emb + pos_emb -> block1..blockN -> ln_f -> head``: pre-norm blocks of causal self-attention and an MLP
(GELU), the head tied to the token embedding, GPT-2 initialisation (N(0, 0.02), residual projections scaled by
1/sqrt(2N)). Inputs are token ids ``[N, T]`` (T at most the block size, taken from the task); the output is
logits ``[N, T, V]``. Slots attach to the blocks' outputs, ``tokens`` kind ``[N, T, D]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t sees positions <= t (torch's fused SDPA kernel)."""

    def __init__(self, d: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"{heads} heads do not divide width {d}")
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = (z.view(n, t, self.heads, d // self.heads).transpose(1, 2) for z in self.qkv(x).split(d, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(n, t, d))


class MLP(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, hidden)
        self.proj = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, d: int, heads: int, mlp_ratio: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads, dropout)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = MLP(d, mlp_ratio * d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class TransformerHost(nn.Module):
    """A GPT-style decoder over ``vocab`` symbols; ``block_size`` positions."""

    def __init__(self, vocab: int, block_size: int, d_model: int, n_layers: int, n_heads: int, mlp_ratio: int,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.block_size, self.depth = block_size, n_layers
        self.tok_emb = nn.Embedding(vocab, d_model)
        self.pos_emb = nn.Embedding(block_size, d_model)
        self.drop = nn.Dropout(dropout)
        for i in range(1, n_layers + 1):
            self.add_module(f"block{i}", Block(d_model, n_heads, mlp_ratio, dropout))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.tok_emb.weight  # tied: one matrix reads and writes symbols
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, 0.0, 0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):  # residual projections: keep the stream's variance flat with depth
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layers))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence of {t} tokens is longer than the block size {self.block_size}")
        h = self.drop(self.tok_emb(idx) + self.pos_emb(torch.arange(t, device=idx.device)))
        return self._rest(0, h)

    def _rest(self, done: int, h: torch.Tensor) -> torch.Tensor:
        for i in range(done + 1, self.depth + 1):
            h = getattr(self, f"block{i}")(h)
        return self.head(self.ln_f(h))

    def forward_from(self, layer: str, h: torch.Tensor) -> torch.Tensor | None:
        """The logits given block ``layer``'s output ``h`` (slot hooks downstream still apply); ``None`` for a
        layer that is not one of the blocks."""
        index = layer.removeprefix("block")
        if not layer.startswith("block") or not index.isdigit() or not 1 <= int(index) <= self.depth:
            return None
        return self._rest(int(index), h)


def seed_heads(width: int) -> int:
    """Heads of a seed's attention at ``width``: head width 16 where it divides, the most heads that do else."""
    return next(h for h in range(max(1, width // 16), 0, -1) if width % h == 0)


class AttentionSeed(nn.Module):
    """``x + proj(attn(ln(x)))``, causal; ``proj`` zero-initialised, so a new seed is the identity."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, seed_heads(width))
        nn.init.zeros_(self.attn.proj.weight)
        nn.init.zeros_(self.attn.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.ln(x))


class BlockSeed(Block):
    """A whole pre-norm block (causal attention + MLP) with both output projections zero-initialised."""

    MLP_RATIO = 4

    def __init__(self, width: int) -> None:
        super().__init__(width, seed_heads(width), self.MLP_RATIO)
        for lin in (self.attn.proj, self.mlp.proj):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)


def attention_params(width: int) -> int:
    return 2 * width + (3 * width * width + 3 * width) + (width * width + width)


def block_params(width: int) -> int:
    hidden = BlockSeed.MLP_RATIO * width
    return attention_params(width) + 2 * width + (width * hidden + hidden) + (hidden * width + width)
