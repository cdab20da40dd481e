"""Attention layers: diffusers' `Attention` (attention_processor.py, `AttnProcessor2_0`), its IP-Adapter
processor `IPAdapterAttnProcessor2_0` and `FeedForward` (attention.py), as the blocks of
emocast/models/attention_text.py use them. Every attention goes through `scaled_dot_product_attention`;
key/value projections can be computed ahead (`kv`) so that tokens which stay fixed for a whole clip are
projected once per clip, not once per denoising step."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ops import TorchOps

KV = tuple[torch.Tensor, torch.Tensor]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head attention on (B, L, heads*d) projections; returns (B, Lq, heads*d)."""
    b, lq, inner = q.shape
    d = inner // heads
    q, k, v = (t.unflatten(-1, (heads, d)).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, lq, inner)


class Attention(nn.Module):
    """Plain attention with the diffusers key layout (`to_q/to_k/to_v` without bias, `to_out.0`)."""

    def __init__(self, query_dim: int, kv_dim: int, heads: int, head_dim: int, out_dim: int | None = None,
                 dtype=None, device=None, operations=TorchOps):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = operations.Linear(query_dim, inner, bias=False, dtype=dtype, device=device)
        self.to_k = operations.Linear(kv_dim, inner, bias=False, dtype=dtype, device=device)
        self.to_v = operations.Linear(kv_dim, inner, bias=False, dtype=dtype, device=device)
        self.to_out = nn.ModuleList([operations.Linear(inner, out_dim or query_dim, dtype=dtype, device=device)])

    def kv(self, context: torch.Tensor) -> KV:
        return self.to_k(context), self.to_v(context)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, kv: KV | None = None) -> torch.Tensor:
        k, v = kv if kv is not None else self.kv(x if context is None else context)
        return self.to_out[0](attend(self.to_q(x), k, v, self.heads))


class _IPProjections(nn.Module):
    """Holds the identity-token projections under the checkpoint's `processor.to_k_ip.0` names."""

    def __init__(self, kv_dim: int, inner: int, dtype=None, device=None, operations=TorchOps):
        super().__init__()
        self.to_k_ip = nn.ModuleList([operations.Linear(kv_dim, inner, bias=False, dtype=dtype, device=device)])
        self.to_v_ip = nn.ModuleList([operations.Linear(kv_dim, inner, bias=False, dtype=dtype, device=device)])


class DecoupledCrossAttention(Attention):
    """Cross-attention over [text tokens, identity tokens] with separate projections for the last
    `ip_tokens` (diffusers' `IPAdapterAttnProcessor2_0`, scale 1): out = to_out(Attn(q, text) + Attn(q, identity))."""

    def __init__(self, query_dim: int, kv_dim: int, heads: int, head_dim: int, ip_tokens: int = 4,
                 dtype=None, device=None, operations=TorchOps):
        super().__init__(query_dim, kv_dim, heads, head_dim, dtype=dtype, device=device, operations=operations)
        self.ip_tokens = ip_tokens
        self.processor = _IPProjections(kv_dim, heads * head_dim, dtype=dtype, device=device, operations=operations)

    def kv(self, context: torch.Tensor) -> tuple[KV, KV]:
        text, ident = context[:, : -self.ip_tokens], context[:, -self.ip_tokens:]
        return (self.to_k(text), self.to_v(text)), (self.processor.to_k_ip[0](ident), self.processor.to_v_ip[0](ident))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, kv=None) -> torch.Tensor:
        """`x` (B, L, C); context/kv rows are either B or a divisor of B (then each context row
        serves a contiguous run of B/rows query rows, e.g. all frames of one CFG half)."""
        (kt, vt), (ki, vi) = kv if kv is not None else self.kv(context)
        rows = kt.shape[0]
        q = self.to_q(x)
        shape = q.shape
        # Frames sharing one context are folded into a longer query sequence: same result, one call.
        q = q.reshape(rows, -1, shape[-1])
        out = attend(q, kt, vt, self.heads) + attend(q, ki, vi, self.heads)
        return self.to_out[0](out.reshape(shape))


class FeedForward(nn.Module):
    """diffusers' GEGLU `FeedForward` (`net.0.proj`, `net.2`), exact-erf GELU."""

    def __init__(self, dim: int, mult: int = 4, dtype=None, device=None, operations=TorchOps):
        super().__init__()
        self.net = nn.ModuleList([_GEGLU(dim, dim * mult, dtype=dtype, device=device, operations=operations),
                                  nn.Identity(), operations.Linear(dim * mult, dim, dtype=dtype, device=device)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class _GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int, dtype=None, device=None, operations=TorchOps):
        super().__init__()
        self.proj = operations.Linear(dim, inner * 2, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return F.gelu(gate).mul_(a)  # = a * gelu(gate) bit for bit, without a third temporary
