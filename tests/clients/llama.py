"""A tiny plain-torch Llama-style decoder with grouped-query attention (random init).

Names follow ``transformers.LlamaModel`` (``model.layers.N.self_attn.q_proj/k_proj/v_proj/o_proj``,
``mlp.gate_proj/up_proj/down_proj``); the attention module keeps ``num_heads``,
``num_key_value_heads`` and ``head_dim`` and reshapes with them; k/v head j serves q heads
``j·n_rep … (j+1)·n_rep − 1`` (``repeat_interleave``, as ``transformers``' ``repeat_kv``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 100
    hidden_size: int = 48
    num_hidden_layers: int = 2
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 8
    intermediate_size: int = 96


class RMSNorm(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class LlamaAttention(nn.Module):
    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.num_heads = c.num_attention_heads
        self.num_key_value_heads = c.num_key_value_heads
        self.head_dim = c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.num_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * c.head_dim, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        rep = self.num_heads // self.num_key_value_heads
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        causal = torch.ones(n, n, dtype=torch.bool).triu(1)
        ctx = F.softmax(scores.masked_fill(causal, float("-inf")), dim=-1) @ v
        return self.o_proj(ctx.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaLayer(nn.Module):
    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size)
        self.self_attn = LlamaAttention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size)
        self.mlp = LlamaMLP(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBody(nn.Module):
    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(LlamaLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class LlamaModel(nn.Module):
    """Hidden states (batch, tokens, hidden) for token ids (batch, tokens)."""

    def __init__(self, config: LlamaConfig | None = None) -> None:
        super().__init__()
        self.config = config or LlamaConfig()
        self.model = LlamaBody(self.config)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids)
