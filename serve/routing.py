"""Per-row LoRA routing with stacked weights (the S-LoRA/Punica idea, in plain torch).

peft's `adapter_names` path loops over the batch's adapters in every adapted layer; on a small
model those Python-level steps cost more than the arithmetic. Here each adapted layer keeps its
resident adapters' A and B stacked ([slots, r, in] and [slots, out, r], ranks zero-padded to
the largest, with each slot's alpha/r), and adds `(x·A[slot]ᵀ·B[slot]ᵀ)·alpha/r` for every row
with two batched matmuls, however many adapters the batch mixes. The last slot is all zeros: the
base. The stacks are the only copy of the adapters' weights on the device.

Only the engine uses this, under its lock; the rows are set before each forward. A routed
model ignores peft's active-adapter state (`set_adapter`, `disable_adapter`): the rows decide.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer


def _routed_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    result = self.base_layer(x, *args, **kwargs)
    router: LoraRouter = self._router
    A, B, scale = self._stacked  # [slots, r, in], [slots, out, r], [slots]
    if router.single is not None:  # every row on one slot: two plain matmuls, or none for the base
        if router.single == len(router.keys):
            return result
        slot = router.single
        delta = F.linear(F.linear(x.to(A.dtype), A[slot]), B[slot]) * scale[slot]
        return result + delta.to(result.dtype)
    rows = router.rows.to(A.device)  # [batch]
    hidden = torch.bmm(x.to(A.dtype), A[rows].transpose(1, 2))  # [batch, seq, r]
    delta = torch.bmm(hidden, B[rows].transpose(1, 2)) * scale[rows].view(-1, 1, 1)  # [batch, seq, out]
    return result + delta.to(result.dtype)


class LoraRouter:
    def __init__(self, model: torch.nn.Module, dtype: torch.dtype | None = None):
        self.model = model
        self.dtype = dtype
        """The stacks' dtype (the base's compute dtype); None keeps the adapters' own."""
        self.keys: list[str] = []
        self.rows = torch.zeros(0, dtype=torch.long)
        self.single: int | None = None
        """The one slot every row uses, when they all use the same."""

    def layers(self) -> list[LoraLayer]:
        return [m for m in self.model.modules() if isinstance(m, LoraLayer)]

    def rebuild(self, keys: list[str]) -> None:
        """Stack the weights of `keys` (slot i = keys[i]) in every adapted layer; patch new layers."""
        self.keys = list(keys)
        for layer in self.layers():
            if not hasattr(layer, "_router"):
                layer._router = self
                layer.forward = types.MethodType(_routed_forward, layer)
            layer._stacked = self._stack(layer)

    def _stack(self, layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stack the resident adapters of one layer, then point peft's own A and B at the stacks.

        Afterwards each adapter's weights exist once, in the compute dtype (peft loads them in
        float32): the stacks are what the routed forward reads, and the views keep peft's state
        dict (eviction to host memory) working on the same storage.
        """
        base = layer.get_base_layer()
        n_in, n_out = base.in_features, base.out_features
        present = [k for k in self.keys if k in layer.lora_A]
        rank = max([layer.r[k] for k in present], default=1)
        ref = layer.lora_A[present[0]].weight if present else None
        dtype = self.dtype or (ref.dtype if ref is not None else torch.float32)
        device = ref.device if ref is not None else torch.device("cpu")
        A = torch.zeros(len(self.keys) + 1, rank, n_in, dtype=dtype, device=device)
        B = torch.zeros(len(self.keys) + 1, n_out, rank, dtype=dtype, device=device)
        scale = torch.zeros(len(self.keys) + 1, dtype=dtype, device=device)
        for slot, key in enumerate(self.keys):
            if key in layer.lora_A:
                r = layer.r[key]
                A[slot, :r] = layer.lora_A[key].weight.detach()
                B[slot, :, :r] = layer.lora_B[key].weight.detach()
                scale[slot] = layer.scaling[key]
        for slot, key in enumerate(self.keys):
            if key in layer.lora_A:
                r = layer.r[key]
                layer.lora_A[key].weight.data = A[slot, :r]
                layer.lora_B[key].weight.data = B[slot, :, :r]
        return A, B, scale

    def set_rows(self, keys: list[str | None]) -> None:
        """One adapter key per row of the next forward; None routes the row to the base."""
        slot = {key: i for i, key in enumerate(self.keys)}
        base = len(self.keys)
        slots = [base if key is None else slot[key] for key in keys]
        self.rows = torch.tensor(slots, dtype=torch.long)
        self.single = slots[0] if len(set(slots)) == 1 else None
