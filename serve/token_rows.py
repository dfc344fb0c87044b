"""Trained token rows per request, inside the mixed batch (peft's `trainable_token_indices`).

An adapter trained on a base that never stops (train/stops.py) holds its own rows for a few
token ids: rows of the output head, and of the input embedding where the two are tied. peft
applies such rows by wrapping the shared embedding and head for its one active adapter
(`TrainableTokensWrapper`), which would give every request of the batch the same rows. Here the
engine loads only the adapter's LoRA into peft (`Engine` strips `trainable_token_indices` from
the config, so no wrapper exists) and this module applies each row's own token rows through
forward hooks on the base's output head and input embedding:

- output head: the base computes every row's logits; for a row on adapter X, the logits of X's
  token ids are recomputed from X's rows (h · rowᵀ). Other rows keep the base's values, bit for bit.
- input embedding: where a row on X holds one of X's token ids, X's row replaces the base's.

The engine sets the rows' adapter keys before each forward (`set_rows`, beside the LoRA router's).
By default the hooks read them from a fixed device buffer and gather every row's rows from one
stack ([indices, tokens, hidden]), so a captured CUDA graph replays correctly for any mix of rows
(serve/slots.py); `per_row` (the deterministic mode) instead computes each row from its own
adapter's rows alone, at their own count, so what a row gets depends on nothing else in the
batch or among the resident adapters. When no row of a step uses token rows, the hooks do nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapters.compat import TokenRows, TokenRowSet

NONE = 0
"""The index of rows whose adapter has no token rows (or the base): it holds no rows of its own."""


@dataclass
class OwnRows:
    """One adapter's rows of one matrix on the device: what the per-row path multiplies by."""

    token_ids: torch.Tensor
    """[tokens]."""
    rows: torch.Tensor
    """[tokens, hidden]."""


@dataclass
class RowStack:
    """One matrix's resident token rows: index s (1..) is the s-th resident adapter with rows for it."""

    token_ids: torch.Tensor
    """[tokens]: every token id some resident adapter trains in this matrix."""
    rows: torch.Tensor
    """[indices, tokens, hidden]: index s's row for token_ids[j] (zeros where it has none)."""
    own: torch.Tensor
    """[indices, tokens]: whether index s has a row for token_ids[j]."""
    sets: list[OwnRows | None]
    """Per index, its own rows alone (the per-row path); None for index NONE and adapters without rows here."""


class TokenRowRouter:
    """The resident adapters' token rows and the hooks that apply each batch row's own."""

    def __init__(self, model: torch.nn.Module, per_row: bool = False):
        self.model = model
        """The transformers model whose output head and input embedding are hooked."""
        self.per_row = per_row
        self._host: dict[str, TokenRows] = {}
        """Adapter key -> its rows (float32, on the CPU), for every loaded adapter that has any."""
        self.keys: list[str] = []
        """The resident adapters with token rows: key i has index i + 1."""
        self._index: dict[str, int] = {}
        """Key -> its index, for `set_rows` every step."""
        self._stacks: dict[str, RowStack | None] = {"input": None, "output": None}
        self._row_index = torch.zeros(0, dtype=torch.long)
        """[rows]: the current rows' indices, in a buffer whose address only a larger batch changes."""
        self._indices: list[int] = []
        self._handles: list = []
        self.version = 0
        """Counts rebuilds and buffer changes: a captured step holds the addresses of the version it saw."""

    def add(self, key: str, rows: TokenRows) -> None:
        """Keep an adapter's token rows (none: nothing to keep); they act once it is resident."""
        if rows:
            self._host[key] = rows

    def remove(self, key: str) -> None:
        self._host.pop(key, None)

    def rebuild(self, resident: list[str]) -> None:
        """Stack the rows of the resident adapters that have any; hook the model while some do."""
        self.keys = [k for k in resident if k in self._host]
        self._index = {key: i for i, key in enumerate(self.keys, start=1)}
        head, embedding = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        self._stacks = {"input": self._stack([self._host[k].input for k in self.keys], embedding.weight),
                        "output": self._stack([self._host[k].output for k in self.keys], head.weight)}
        self._indices = []
        self._hook(head, embedding)
        self.version += 1

    @staticmethod
    def _stack(sets: list[TokenRowSet | None], weight: torch.Tensor) -> RowStack | None:
        """The rows of one matrix in the weight's device and dtype (peft computes with them so too)."""
        if all(s is None for s in sets):
            return None
        ids = sorted({t for s in sets if s is not None for t in s.token_ids})
        column = {t: j for j, t in enumerate(ids)}
        rows = torch.zeros(len(sets) + 1, len(ids), weight.shape[1], dtype=weight.dtype, device=weight.device)
        own = torch.zeros(len(sets) + 1, len(ids), dtype=torch.bool, device=weight.device)
        placed: list[OwnRows | None] = [None]
        for index, s in enumerate(sets, start=1):
            if s is None:
                placed.append(None)
                continue
            mine = OwnRows(torch.tensor(s.token_ids, device=weight.device), s.rows.to(rows))
            at = torch.tensor([column[t] for t in s.token_ids], device=weight.device)
            rows[index, at], own[index, at] = mine.rows, True
            placed.append(mine)
        return RowStack(torch.tensor(ids, device=weight.device), rows, own, placed)

    def _hook(self, head: torch.nn.Module, embedding: torch.nn.Module) -> None:
        """Hook the current head and embedding (an adapter may have replaced a module since)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.keys:
            self._handles = [head.register_forward_hook(self._output_hook),
                             embedding.register_forward_hook(self._input_hook)]

    def set_rows(self, keys: list[str | None]) -> None:
        """One adapter key per row of the next forward (None: the base)."""
        self._indices = [self._index.get(k, NONE) for k in keys] if self.keys else []
        if not self.active():
            return
        device = next(s for s in self._stacks.values() if s is not None).rows.device
        if self._row_index.numel() < len(keys) or self._row_index.device != device:
            self._row_index = torch.zeros(max(len(keys), 2 * self._row_index.numel()), dtype=torch.long, device=device)
            self.version += 1
        self._row_index[: len(keys)].copy_(torch.tensor(self._indices))

    def active(self) -> bool:
        """Whether some row of the current step uses token rows."""
        return any(self._indices)

    def signature(self) -> tuple:
        """What a captured step computes beyond its inputs' values: nothing, the gathered rows
        (right for any mix), or with `per_row` the rows of exactly these indices."""
        if not self.active():
            return ()
        return ("token rows", tuple(self._indices)) if self.per_row else ("token rows",)

    # -- the hooks ---------------------------------------------------------------------------
    def _output_hook(self, module, args, logits: torch.Tensor):
        stack = self._stacks["output"]
        if stack is None or not self.active():
            return None
        hidden = args[0]  # [batch, positions, hidden]
        if self.per_row:
            return _output_per_row(stack, self._indices, hidden, logits)
        index = self._row_index[: logits.shape[0]]
        fresh = torch.matmul(hidden.to(stack.rows.dtype), stack.rows[index].transpose(1, 2))  # [batch, positions, tokens]
        base = logits.index_select(-1, stack.token_ids)
        chosen = torch.where(stack.own[index].unsqueeze(1), fresh.to(logits.dtype), base)
        return logits.index_copy(-1, stack.token_ids, chosen)

    def _input_hook(self, module, args, embeds: torch.Tensor):
        stack = self._stacks["input"]
        if stack is None or not self.active():
            return None
        ids = args[0]  # [batch, positions]
        index = self._row_index[: ids.shape[0]]
        match = (ids.unsqueeze(-1) == stack.token_ids) & stack.own[index].unsqueeze(1)  # [batch, positions, tokens]
        which = match.to(torch.uint8).argmax(-1)  # an adapter's ids are distinct: at most one match
        rows = stack.rows[index.unsqueeze(1), which]  # [batch, positions, hidden]
        scale = getattr(module, "embed_scale", None)  # scaled embeddings (Gemma 3) scale their output, as peft does
        if isinstance(scale, torch.Tensor):
            rows = rows * scale.to(rows.dtype)
        return torch.where(match.any(-1, keepdim=True), rows.to(embeds.dtype), embeds)


def _output_per_row(stack: RowStack, indices: list[int], hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Each row's token logits from its own adapter's rows alone ([positions, hidden] x [hidden, own tokens])."""
    logits = logits.clone()
    for item, index in enumerate(indices):
        own = stack.sets[index]
        if own is None:
            continue
        fresh = torch.mm(hidden[item].to(own.rows.dtype), own.rows.t())  # [positions, own tokens]
        logits[item].index_copy_(-1, own.token_ids, fresh.to(logits.dtype))
    return logits
