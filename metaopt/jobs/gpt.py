"""A small GPT (the nanoGPT character model's architecture) for the jobs and the benchmarks.

Pre-norm transformer blocks (LayerNorm → causal self-attention → residual, LayerNorm → 4× GELU
MLP → residual), learned position embeddings, final LayerNorm, output head tied to the token
embedding, weights initialised N(0, 0.02) and biases at zero.

The defaults of ``GPTConfig`` are nanoGPT's Shakespeare-char configuration (6 layers,
6 heads, n_embd 384, vocab 65, block 256: 10.7M parameters), which the benchmarks use; the
``metaopt run`` default job builds a smaller one from its config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["GPT", "GPTConfig", "Block"]


@dataclass
class GPTConfig:
    """The GPT's sizes: vocabulary, context (block) length, layers, heads, embedding width, dropout.

    The defaults are nanoGPT's Shakespeare-char configuration; ``n_embd`` must be a multiple of
    ``n_head`` (ValueError otherwise).
    """

    vocab_size: int = 65
    block_size: int = 256
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")


class Block(nn.Module):
    """One pre-norm transformer block."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.fc_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block on ``x`` of shape (batch, time, n_embd): causal self-attention, then the MLP, each residual."""
        b, t, c = x.shape
        q, k, v = self.attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        x = x + self.resid_drop(self.proj(y.transpose(1, 2).contiguous().view(b, t, c)))
        return x + self.resid_drop(self.fc_proj(F.gelu(self.fc(self.ln_2(x)))))


class GPT(nn.Module):
    """``GPT(cfg)(idx, targets)`` → ``(logits, loss)``; ``loss`` is None without targets."""

    def __init__(self, cfg: GPTConfig = GPTConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in nanoGPT
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def param_groups(self) -> list[dict]:
        """The parameters in three named param groups, for coefficients per group.

        The groups: embeddings (token — tied with the output head — and position), blocks (every
        transformer block), head (the final LayerNorm; the output projection is the token
        embedding).
        """
        return [
            {"name": "embeddings", "params": [self.wte.weight, self.wpe.weight]},
            {"name": "blocks", "params": list(self.blocks.parameters())},
            {"name": "head", "params": list(self.ln_f.parameters())},
        ]

    def num_parameters(self) -> int:
        """Trainable parameters, the tied embedding counted once."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """``(logits, loss)`` for token ids ``idx`` (batch, time); ``loss`` is the cross-entropy, None without targets."""
        t = idx.shape[1]
        if t > self.cfg.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.cfg.block_size}")
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(t, device=idx.device)))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
