"""Pre-norm Transformer layer of the code predictor (positions added to queries and keys only)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class SelfAttention(nn.Module):
    """Multi-head self-attention with the ``nn.MultiheadAttention`` parameter layout.

    ``in_proj_weight`` ``(3D, D)`` stacks the q, k, v projections; ``out_proj`` is a Linear. Unlike
    ``nn.MultiheadAttention`` this takes batch-first tokens and uses ``scaled_dot_product_attention``.
    """

    def __init__(self, dim: int, n_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % n_head:
            raise ValueError(f"dim {dim} must be divisible by n_head {n_head}")
        self.n_head = n_head
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, qk: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``qk`` (queries and keys source) and ``v`` (values source), both ``(B, L, D)`` -> ``(B, L, D)``."""
        d = qk.shape[-1]
        q, k = F.linear(qk, self.in_proj_weight[: 2 * d], self.in_proj_bias[: 2 * d]).chunk(2, dim=-1)
        v = F.linear(v, self.in_proj_weight[2 * d :], self.in_proj_bias[2 * d :])
        q, k, v = (rearrange(t, "b l (h e) -> b h l e", h=self.n_head) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(rearrange(out, "b h l e -> b l (h e)"))


class TransformerLayer(nn.Module):
    """LN -> self-attention (+pos on q, k) -> residual; LN -> MLP (GELU) -> residual. ``(B, L, D)``."""

    def __init__(self, dim: int, n_head: int, dim_mlp: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.self_attn = SelfAttention(dim, n_head, dropout)
        self.linear1 = nn.Linear(dim, dim_mlp)
        self.linear2 = nn.Linear(dim_mlp, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, L, D)``, ``pos`` ``(L, D)`` or ``(B, L, D)``."""
        h = self.norm1(x)
        x = x + self.dropout(self.self_attn(h + pos, h))
        h = self.linear2(self.dropout(F.gelu(self.linear1(self.norm2(x)))))
        return x + self.dropout(h)
