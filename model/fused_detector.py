"""K AdapterDetectors as one module: their trainable weights stacked on a leading trial dimension.

Every trainable layer of the K trials runs as one batched kernel (``baddbmm`` on ``[K, ...]``
weights) instead of K small ones; the frozen Stage 1 adapter runs once for all of them. The forward
pass mirrors ``model.detector.AdapterDetector.forward`` line by line, and each trial's weights are
also reachable as ordinary parameters (``views``), so torch's own optimizers update them.
model/fused.py trains it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from model.detector import AdapterDetector

__all__ = ["FusedDetector"]


class FusedDetector(nn.Module):
    """K AdapterDetectors with their trainable weights stacked on a leading trial dimension.

    Stage 1 is frozen and identical for every trial, so it is held once. ``forward`` mirrors
    ``AdapterDetector.forward`` line by line (tests compare the two); ``views(k)`` gives trial k's
    parameters as separate ``nn.Parameter`` objects sharing the stacked storage, for its optimizer.
    """

    def __init__(self, detectors: Sequence[AdapterDetector]) -> None:
        super().__init__()
        template = detectors[0]
        self.template = template  # structure, frozen Stage 1, eps and head counts
        self.names = [n for n, p in template.named_parameters() if p.requires_grad]
        self.stacked = nn.ParameterDict({
            n.replace(".", "__"): nn.Parameter(torch.stack([dict(d.named_parameters())[n].detach() for d in detectors]))
            for n in self.names
        })
        self.dropout_p = [float(d.dropout.p) for d in detectors]
        self._views = [self._make_views(k) for k in range(len(detectors))]

    def __len__(self) -> int:
        return len(self.dropout_p)

    def p(self, name: str) -> torch.Tensor:
        return self.stacked[name.replace(".", "__")]

    def _make_views(self, k: int) -> dict[str, nn.Parameter]:
        return {n: nn.Parameter(self.p(n).data[k], requires_grad=True) for n in self.names}

    def _apply(self, fn, recurse=True):
        # .to(device) / .half() may give the stacked weights new storage: re-point the views there,
        # or the optimizers would update stale copies.
        super()._apply(fn, recurse)
        self._repoint_views()
        return self

    def _repoint_views(self) -> None:
        for k, views in enumerate(self._views):
            for n, view in views.items():
                view.data = self.p(n).data[k]

    def views(self, k: int) -> dict[str, nn.Parameter]:
        """Trial k's parameters (storage shared with the stacked weights), by AdapterDetector name."""
        return self._views[k]

    def trainable_groups(self, k: int) -> dict[str, list[nn.Parameter]]:
        """Trial k's optimizer groups, in the same roles and order as AdapterDetector's."""
        views = self._views[k]
        groups = {}
        for role, params in self.template.trainable_groups().items():
            names = {id(p): n for n, p in self.template.named_parameters()}
            groups[role] = [views[names[id(p)]] for p in params]
        return groups

    def publish_grads(self) -> None:
        """Hand each trial's slice of the stacked gradients to its view parameters."""
        for n in self.names:
            grad = self.p(n).grad
            for k, views in enumerate(self._views):
                views[n].grad = None if grad is None else grad[k]

    def zero_grad_stacked(self) -> None:
        for param in self.stacked.values():
            param.grad = None

    def keep(self, indices: Sequence[int]) -> None:
        """Drop every trial not in ``indices`` (kept in that order); views keep their identity,
        so each optimizer's state stays attached to its trial."""
        index = torch.as_tensor(list(indices), dtype=torch.long, device=next(iter(self.stacked.values())).device)
        for n in self.names:
            old = self.p(n)
            self.stacked[n.replace(".", "__")] = nn.Parameter(old.detach().index_select(0, index))
        self._views = [self._views[i] for i in indices]
        self.dropout_p = [self.dropout_p[i] for i in indices]
        self._repoint_views()

    def state_dict_of(self, k: int) -> dict[str, torch.Tensor]:
        """Trial k as an AdapterDetector state dict (what the serial run saves in best.pt)."""
        state = {}
        for key, value in self.template.state_dict().items():
            state[key] = self.p(key).detach()[k].clone() if key in self.names else value.detach().clone()
        return state

    # ---- the forward pass, mirroring model/detector.py ---------------------------------------

    def _linear(self, x: torch.Tensor, name: str, shared: bool = False) -> torch.Tensor:
        """x [K, ..., in] (or [..., in] shared by every trial) -> [K, ..., out]."""
        weight, bias = self.p(f"{name}.weight"), self.p(f"{name}.bias")
        k = weight.shape[0]
        lead = x.shape[:-1] if shared else x.shape[1:-1]
        flat = x.reshape(1, -1, x.shape[-1]).expand(k, -1, -1) if shared else x.reshape(k, -1, x.shape[-1])
        return torch.baddbmm(bias.unsqueeze(1), flat, weight.transpose(1, 2)).view(k, *lead, weight.shape[1])

    def _layer_norm(self, x: torch.Tensor, name: str, eps: float, shared: bool = False) -> torch.Tensor:
        weight, bias = self.p(f"{name}.weight"), self.p(f"{name}.bias")
        k, width = weight.shape
        normed = F.layer_norm(x, (width,), None, None, eps)  # shared input: normalised once for all trials
        shape = (k,) + (1,) * (x.dim() - (0 if shared else 1) - 1) + (width,)
        return normed * weight.view(shape) + bias.view(shape)

    def _mlp_block(self, tokens: torch.Tensor, name: str, block: nn.Module, shared: bool) -> torch.Tensor:
        h = self._layer_norm(tokens, f"{name}.norm", block.norm.eps, shared)
        h = self._linear(F.gelu(self._linear(h, f"{name}.fc1")), f"{name}.fc2")
        return tokens + h

    def forward(self, cls: torch.Tensor, patches: torch.Tensor, dropout_masks=None) -> tuple[torch.Tensor, torch.Tensor]:
        """cls [B, D], patches [B, L, D] -> logits [K, B], gate [K, B].

        ``dropout_masks(fused)`` applies each trial's dropout to fused [K, B, D] in training."""
        t = self.template
        with torch.no_grad():
            s1 = t.stage1(cls)  # [B, D], shared
        s2, shared = patches, True
        for i, block in enumerate(t.stage2):
            s2, shared = self._mlp_block(s2, f"stage2.{i}", block, shared), False
        fused, gate = self._fusion(s1, s2)
        if dropout_masks is not None:
            fused = dropout_masks(fused)
        head = self._layer_norm(fused, "head.0", t.head[0].eps)
        return self._linear(head, "head.1").squeeze(-1), gate

    def _fusion(self, s1: torch.Tensor, s2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, batch, length, _ = s2.shape
        heads = self.template.fusion.heads
        q = self._linear(s1, "fusion.q", shared=True).view(k, batch, 1, heads, -1).transpose(2, 3)  # [K, B, H, 1, d]
        key = self._linear(s2, "fusion.k").view(k, batch, length, heads, -1).transpose(2, 3)  # [K, B, H, L, d]
        value = self._linear(s2, "fusion.v").view(k, batch, length, heads, -1).transpose(2, 3)
        attended = F.scaled_dot_product_attention(q.flatten(0, 1), key.flatten(0, 1), value.flatten(0, 1)).unflatten(0, (k, batch))
        c = self._linear(attended.transpose(2, 3).reshape(k, batch, -1), "fusion.out")  # [K, B, D]
        s1k = s1.expand(k, -1, -1)
        gate = torch.sigmoid(self._linear(torch.cat([s1k, c], dim=-1), "fusion.gate"))  # [K, B, 1]
        return gate * s1k + (1 - gate) * c, gate.squeeze(-1)
