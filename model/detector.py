"""The adapter detector on top of frozen CLIP tokens.

    cls token  -> Stage 1 adapter (frozen) -> s1            (the query)
    patch toks -> Stage 2 adapter (trained) -> s2 tokens    (keys and values)
    c    = cross-attention(q=s1, kv=s2)
    gate = sigmoid(W [s1; c] + b),  b initialised to gate_init_bias
    fused = gate * s1 + (1 - gate) * c -> dropout -> head -> logit

On ViT-L-14 widths (D = 1024) the trainable part is ~9.45M parameters, Stage 2 ~8.4M, matching the
reference report's ~9.4M / ~8.3M.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig


class Stage1Adapter(nn.Module):
    """Residual bottleneck MLP on the CLS token. Trained once by `prepare`, then frozen."""

    def __init__(self, width: int, config: ModelConfig) -> None:
        super().__init__()
        hidden = max(1, round(width * config.stage1_hidden_ratio))
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return cls + self.fc2(F.gelu(self.fc1(self.norm(cls))))


class Stage2Block(nn.Module):
    """Pre-norm residual MLP applied to every patch token."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens + self.fc2(F.gelu(self.fc1(self.norm(tokens))))


class Stage2Adapter(nn.Sequential):
    def __init__(self, width: int, config: ModelConfig) -> None:
        hidden = max(1, round(width * config.stage2_hidden_ratio))
        super().__init__(*(Stage2Block(width, hidden) for _ in range(config.stage2_blocks)))


class GatedCrossAttentionFusion(nn.Module):
    """One query (s1) attends over the Stage 2 tokens; a scalar sigmoid gate mixes s1 and the result."""

    def __init__(self, width: int, config: ModelConfig, gate_init_bias: float) -> None:
        super().__init__()
        inner = max(config.attn_heads, round(width * config.attn_dim_ratio))
        if inner % config.attn_heads:
            raise ValueError(f"model.attn_heads: {config.attn_heads} does not divide the attention width {inner}")
        self.heads = config.attn_heads
        self.q = nn.Linear(width, inner)
        self.k = nn.Linear(width, inner)
        self.v = nn.Linear(width, inner)
        self.out = nn.Linear(inner, width)
        self.gate = nn.Linear(2 * width, 1)
        # Zero weights make the initial gate exactly sigmoid(gate_init_bias) for every input, so the
        # bias alone sets where the mix starts (the reference's bias 1.0 started at 0.73 and saturated).
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, gate_init_bias)

    def forward(self, s1: torch.Tensor, s2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length, _ = s2.shape
        q = self.q(s1).view(batch, 1, self.heads, -1).transpose(1, 2)  # [B, H, 1, d]
        k = self.k(s2).view(batch, length, self.heads, -1).transpose(1, 2)  # [B, H, L, d]
        v = self.v(s2).view(batch, length, self.heads, -1).transpose(1, 2)
        attended = F.scaled_dot_product_attention(q, k, v)  # [B, H, 1, d]
        c = self.out(attended.transpose(1, 2).reshape(batch, -1))
        gate = torch.sigmoid(self.gate(torch.cat([s1, c], dim=-1)))  # [B, 1]
        return gate * s1 + (1 - gate) * c, gate.squeeze(-1)


@dataclass(frozen=True)
class DetectorOutput:
    logits: torch.Tensor  # [B]
    gate: torch.Tensor  # [B], weight of s1 in the fused feature


class AdapterDetector(nn.Module):
    """Stage 1 (frozen) + Stage 2 + gated fusion + head. Reads cached or freshly computed tokens."""

    def __init__(self, width: int, config: ModelConfig, *, dropout: float, gate_init_bias: float, prior_fake: float = 0.5) -> None:
        super().__init__()
        if not 0 < prior_fake < 1:
            raise ValueError(f"prior_fake must be in (0, 1), got {prior_fake}")
        self.stage1 = Stage1Adapter(width, config)
        self.stage1.requires_grad_(False)
        self.stage2 = Stage2Adapter(width, config)
        self.fusion = GatedCrossAttentionFusion(width, config, gate_init_bias)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 1))
        # Start at the training prior: the first predictions are the majority class, as in the
        # reference runs' degenerate phase, and the loss does not begin by un-learning a random bias.
        nn.init.constant_(self.head[1].bias, math.log(prior_fake / (1 - prior_fake)))

    def train(self, mode: bool = True) -> "AdapterDetector":
        super().train(mode)
        self.stage1.eval()  # frozen, whatever the caller says
        return self

    def forward(self, cls: torch.Tensor, patches: torch.Tensor) -> DetectorOutput:
        with torch.no_grad():
            s1 = self.stage1(cls)
        fused, gate = self.fusion(s1, self.stage2(patches))
        return DetectorOutput(logits=self.head(self.dropout(fused)).squeeze(-1), gate=gate)

    def trainable_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by role, for differential learning rates: adapter vs fusion + head."""
        return {
            "adapter": list(self.stage2.parameters()),
            "head": list(self.fusion.parameters()) + list(self.head.parameters()),
        }

    def parameter_counts(self) -> dict[str, int]:
        count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
        counts = {
            "stage1 (frozen)": count(self.stage1),
            "stage2 adapter": count(self.stage2),
            "fusion": count(self.fusion),
            "head": count(self.head),
        }
        counts["trainable"] = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return counts
