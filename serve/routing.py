"""Per-row LoRA routing with stacked weights (the S-LoRA/Punica idea).

peft's `adapter_names` path loops over the batch's adapters in every adapted layer; on a small
model those Python-level steps cost more than the arithmetic. Here each adapted layer keeps its
resident adapters' A and B stacked, A as [adapters·R, in] and Bᵀ as [adapters·R, out] (ranks
zero-padded to the largest, R; the adapter at index i owns rows i·R .. i·R+R of both), and one
step costs the same few operations per layer however many adapters the batch mixes.

Three pieces, each with one job:

- `stack_adapters` is a function from the resident adapters (their keys and weights, in index
  order) to a `StackSet`: every adapted layer's stacks, built whole and never changed. The router
  then keeps each adapter's weights as views into them (`stacked_weights`; `share_storage` points
  peft's own A and B there for an adapter peft loaded), so the stacks are the only copy on the device.
- `RowPlan` is what one forward computes: each batch item's adapter index, and the masks or
  groups the paths derive from them. `LoraRouter.set_rows` makes a new plan for each step.
- `Path` names the ways a layer adds its delta, and `torch_path` picks one from the plan and the
  step's row count; `PATHS` holds their functions:
  - `kernel`: on the CPU in float32, one call of a fused kernel (`serve/kernels`) that computes
    each row's `scale·(x·Aᵢᵀ)·Bᵢ` for its own adapter i (tried first; it declines what it does
    not take, and a torch path runs);
  - `single`: every row uses one adapter: two products with that adapter's own blocks (for a
    single row in a step replayed from a CUDA graph, the first is a compiled reduction:
    `SHRINKS`, `auto_shrinks`);
  - `masked`: rows mix adapters: `h = x·Aᵀ` for every adapter at once, `h *= mask` (each row
    keeps its own adapter's columns, times its alpha/r), `y += h·Bᵀ`;
  - `grouped`: a long mixed prefill: each adapter's own batch items apart;
  - `per_row`: the deterministic mode: each batch item's products alone, at its own rank;
  - `base`: every row uses the base, nothing is added.

Layers handed the same input (q/k/v, gate/up: `PACKED_INPUTS`) share one A stack on the torch
paths, so `x·Aᵀ` is one product for the group rather than one per layer (vLLM packs its q/k/v
LoRA the same way): a GPU's decode step is set by how many kernels it launches. The product is
the one piece of state a step carries between layers (`InputGroup.shares`).

Only the engine uses this, under its lock; the rows are set before each forward. A routed
model ignores peft's active-adapter state (`set_adapter`, `disable_adapter`): the plan decides.
Plain LoRA on linear layers only: the registry refuses what this cannot compute (DoRA,
embedding LoRA, modules_to_save).
"""

from __future__ import annotations

import enum
import functools
import importlib.util
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from peft.tuners.lora import LoraLayer

from adapters.weights import AdapterWeights, LoraPair
from serve import kernels

KERNEL_MAX_ROWS = 64
"""Above this many rows (a long prefill) torch's blocked matrix products beat the row-at-a-time kernel."""

GPU_MASKED_MAX_ELEMENTS = 1 << 24
"""On a GPU a mixed step takes the masked path (every adapter's product for every row, three
kernels per layer) unless its [rows, adapters·R] hidden tensor would pass this many elements
(32 MiB in bf16). Grouping launches about five kernels per adapter per layer, and on a GPU at
these sizes the launches, not the arithmetic, set the time; at the bound the masked path's extra
arithmetic is still a few percent of the base's own."""

KERNELS = ("auto", "torch")
"""`LoraRouter`'s kernel choices: auto (the fused CPU kernel for float32 on the CPU, torch ops
elsewhere), torch (torch ops everywhere). (A Triton kernel for GPU decode steps was tried and left
for bench/: docs/history/triton-lora-kernel.md says what it measured.)"""

BASE = -1
"""A batch item's adapter index when it uses the base alone."""

MIX = -2
"""A batch item's adapter index when it mixes adapters or scales one (`RowPlan.mixes` holds its parts)."""

RowKey = str | tuple[tuple[str, float], ...] | None
"""What `LoraRouter.set_rows` takes per batch item: an adapter key (at its trained strength), a
mix as (key, scale) pairs, or None for the base."""


class Path(enum.StrEnum):
    """The ways an adapted layer adds the step's LoRA delta (the module docstring says when each runs)."""

    BASE = "base"
    KERNEL = "kernel"
    SINGLE = "single"
    MASKED = "masked"
    GROUPED = "grouped"
    PER_ROW = "per_row"


def _row_reduce(x2: torch.Tensor, At: torch.Tensor) -> torch.Tensor:
    """x2 [1, in] times At [in, R]: each of Aᵀ's R columns times the row, summed over `in` in float32."""
    return (At.t() * x2).sum(-1, dtype=torch.float32).to(At.dtype).unsqueeze(0)


REDUCE_RECOMPILE_LIMIT = 64
"""Shapes `reduce` compiles for before dynamo runs new ones eagerly: a Llama block has four
(in, M·R) shapes per rank R (q/k/v, o, gate/up, down), and the rank changes with the largest
resident adapter, which would soon pass dynamo's default of 8 per function."""


@functools.cache
def _compiled_row_reduce():
    # Made on first use: importing torch's compiler is not free, and only GPU replayed steps need it.
    return torch.compile(_row_reduce, dynamic=False, fullgraph=True)


def _reduce(x2: torch.Tensor, At: torch.Tensor) -> torch.Tensor:
    if x2.shape[0] != 1:
        return torch.mm(x2, At)
    # suppress_errors: a compiler that fails here (no working Triton, say) logs it and the same
    # product runs eagerly, rather than failing the step and with it the server's CUDA graphs
    with torch._dynamo.config.patch(recompile_limit=REDUCE_RECOMPILE_LIMIT, suppress_errors=True):
        return _compiled_row_reduce()(x2, At)


SHRINKS = {"mm": torch.mm, "reduce": _reduce}
"""How the single path computes `x·Aᵀ` ([rows, in] times one adapter's [in, R] block, a
transposed view of its contiguous rows): `LoraRouter(shrink=...)`; `auto` uses both. For a single
row (a batch-1 decode step) cuBLAS runs `mm` as a split-K GEMM plus a reduction kernel, slow for
the little memory it reads (docs/performance.md). `reduce` is one kernel that Inductor generates
(torch.compile) for the elementwise product and its sum, faster on a GPU in CUDA graphs
(bench/lora_products.py times both, and the other ways torch offers). Its call costs dynamo's
guards and Inductor's wrapper on the host, many times `mm`'s, which only a replayed graph skips.
More rows always take `mm`."""

SHRINK_CHOICES = ("auto", *SHRINKS)
"""`LoraRouter(shrink=...)`: auto picks per step (`auto_shrinks`), the others apply to every step."""


def auto_shrinks(device: torch.device) -> tuple[str, str]:
    """auto's shrink for (steps launched from Python, steps replayed from CUDA graphs) on `device`:
    `reduce` only where its host cost is never paid, in replayed steps, and only on a CUDA device
    with Triton for Inductor to write the kernel in; `mm` everywhere else."""
    replayed = "reduce" if device.type == "cuda" and triton_installed() else "mm"
    return "mm", replayed


@functools.cache
def triton_installed() -> bool:
    """Whether Inductor can write GPU kernels here (torch's CUDA builds bring Triton with them)."""
    return importlib.util.find_spec("triton") is not None


PACKED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Sibling layers that transformers' decoder blocks call on one and the same input tensor. Only a
hint: a group's shared product is reused only for that very tensor (see `InputGroup.shares`)."""


class InputGroup:
    """Adapted sibling layers that take the same input: their A stacks are one tensor, and one
    product `x·Aᵀ` serves all of them, each reading its own R columns per adapter."""

    def __init__(self, A: torch.Tensor, members: int, rank: int):
        self.A = A
        """[adapters·M·R, in]: adapter i, member m owns rows (i·M + m)·R .. (i·M + m)·R + R."""
        self.members, self.rank = members, rank
        self.adapters = A.shape[0] // (members * rank)
        self.At = [A[i : i + members * rank].t() for i in range(0, A.shape[0], members * rank)]
        """Per adapter, its [in, M·R] block of Aᵀ."""
        self.clear()

    def clear(self) -> None:
        self._x, self._shares, self._step, self._version, self._left = None, (), -1, -1, 0

    def holds_nothing(self) -> bool:
        """Whether no input or product is kept (every member of the last step read its share)."""
        return self._x is None

    def shares(self, x: torch.Tensor, x2: torch.Tensor, index: int | None, step: int, batch: int,
               shrink=torch.mm) -> tuple:
        """Each member's share of `x2·Aᵀ`: with one adapter for every row (its index), [rows, R]
        per member (the product computed by `shrink`, a `SHRINKS` function); with mixed rows
        (index None), [batch, seq, adapters, R] per member, every adapter's columns. Computed by
        the first member to see `x` in a step and kept until every member has had its share, only
        for the same tensor, unchanged (its version), in the same step (`RowPlan.step`): anything
        else recomputes."""
        version = -2 if x.is_inference() else x._version  # inference tensors keep no version counter
        if not (self._x is x and self._version == version and self._step == step):
            if index is not None:
                self._shares = shrink(x2, self.At[index]).split(self.rank, dim=1)
            else:
                hidden = torch.mm(x2, self.A.t())  # [rows, adapters·M·R]
                self._shares = hidden.view(batch, -1, self.adapters, self.members, self.rank).unbind(3)
            self._x, self._version, self._step, self._left = x, version, step, self.members
        shares = self._shares
        self._left -= 1
        if self._left == 0:  # every member has had its share: hold neither the input nor the product
            self.clear()
        return shares


@dataclass(frozen=True)
class LayerStacks:
    """One adapted layer's resident adapters, and the per-adapter views the single path uses."""

    A: torch.Tensor
    """[adapters·R, in]; adapter i owns rows i·R .. i·R + r_i (the rest of its R rows are zero).
    In a group: [adapters, R, in], a view into the group's stack."""
    Bt: torch.Tensor
    """[adapters·R, out]: B transposed, the same rows per adapter."""
    scale: tuple[float, ...]
    """alpha/r per adapter."""
    scale_t: torch.Tensor
    """The same as a float32 tensor on the layer's device, for the kernels."""
    At: tuple[torch.Tensor, ...]
    """Per adapter, its [in, R] block of Aᵀ (a view)."""
    Bts: tuple[torch.Tensor, ...]
    """Per adapter, its [R, out] block of Bᵀ (a view)."""
    mask_id: int
    """Which of the plan's row masks fits this layer's scales (layers sharing scales share one)."""
    ranks: tuple[int, ...]
    """Each adapter's own rank in this layer (0 where it does not adapt it)."""
    group: InputGroup | None = None
    """The siblings this layer shares its A stack and input product with; A is then a
    [adapters, R, in] view into the group's stack."""
    member: int = 0
    """This layer's place in its group."""


@dataclass(frozen=True)
class StackSet:
    """Every adapted layer's stacks for one resident set, adapter i being `keys[i]`."""

    keys: tuple[str, ...]
    rank: int
    """R: every adapter's rank, padded to the largest resident one."""
    device: torch.device
    """Where the stacks live (the masks must match)."""
    dtype: torch.dtype
    scale_vectors: tuple[tuple[float, ...], ...]
    """The distinct per-adapter scale vectors among the layers (`LayerStacks.mask_id` indexes it)."""
    layers: tuple[tuple[LoraLayer, LayerStacks], ...]
    input_groups: tuple[InputGroup, ...] = ()

    def columns(self) -> int:
        """The width of a mixed step's hidden tensor: every adapter's R columns."""
        return len(self.keys) * self.rank


NamedLayers = list[tuple[str, LoraLayer]]
"""The adapted layers with their module names in the base model (`model.layers.0.self_attn.q_proj`):
the names an adapter's weights file uses (`adapters.weights.AdapterWeights`)."""


def peft_weights(layers: NamedLayers, key: str) -> AdapterWeights:
    """The weights of an adapter that peft itself loaded into these layers (by `load_adapter`)."""
    return AdapterWeights({name: LoraPair(layer.lora_A[key].weight.detach(), layer.lora_B[key].weight.detach(),
                                          float(layer.scaling[key]))
                           for name, layer in layers if key in layer.lora_A})


def stack_adapters(layers: NamedLayers, keys: list[str], weights: list[AdapterWeights], dtype: torch.dtype | None,
                   siblings: list[list[LoraLayer]] = ()) -> StackSet:
    """Stack the adapters `keys` (index i = keys[i], its weights `weights[i]`) of every layer into
    new tensors in `dtype` (None: the adapters' own), siblings sharing one A stack per group.
    Reads the weights only."""
    rank = max([pair.rank for w in weights for pair in w.pairs.values()], default=1)
    device, dtype = _placement(layers, weights, dtype)
    place: dict[int, tuple[InputGroup, int]] = {}  # id(layer) -> (its group, its place in it)
    groups = []
    for members in siblings:
        base = members[0].get_base_layer()
        A = torch.zeros(len(keys) * len(members) * rank, base.in_features, dtype=dtype, device=base.weight.device)
        groups.append(InputGroup(A, len(members), rank))
        place.update({id(layer): (groups[-1], m) for m, layer in enumerate(members)})
    scale_vectors: list[tuple[float, ...]] = []
    stacked = []
    for name, layer in layers:
        pairs = [w.pairs.get(name) for w in weights]
        stacks = _stack_layer(layer, pairs, rank, dtype, scale_vectors, *place.get(id(layer), (None, 0)))
        stacked.append((layer, stacks))
    return StackSet(tuple(keys), rank, device, dtype, tuple(scale_vectors), tuple(stacked), tuple(groups))


def _placement(layers: NamedLayers, weights: list[AdapterWeights], dtype: torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    """The masks' device (the first adapted layer's) and the stacks' dtype: the one asked for, or the adapters' own."""
    device = layers[0][1].get_base_layer().weight.device if layers else torch.device("cpu")
    ref = next((pair.A for w in weights for pair in w.pairs.values()), None)
    return device, dtype or (ref.dtype if ref is not None else torch.float32)


def _stack_layer(layer: LoraLayer, pairs: list[LoraPair | None], R: int, dtype: torch.dtype, scale_vectors: list,
                 group: InputGroup | None, member: int) -> LayerStacks:
    """One layer's stacks (its A in its group's stack, if it has a group) from each adapter's pair
    for it (None: the adapter leaves the layer alone); records its scale vector."""
    base = layer.get_base_layer()
    n = len(pairs)
    device = base.weight.device  # the layer's own: a model split across devices keeps each layer's stacks beside it
    if group is None:
        A = torch.zeros(n * R, base.in_features, dtype=dtype, device=device)
        starts = [i * R for i in range(n)]
    else:  # adapter i's block for this member: rows (i·M + member)·R of the group's stack
        A = group.A.view(n, group.members, R, base.in_features)[:, member]  # [adapters, R, in]
        starts = [(i * group.members + member) * R for i in range(n)]
    A_rows = A if group is None else group.A  # [rows, in] either way; `starts` index it
    Bt = torch.zeros(n * R, base.out_features, dtype=dtype, device=device)
    scale, ranks = [0.0] * n, [0] * n
    for i, pair in enumerate(pairs):
        if pair is not None:
            r, start = pair.rank, starts[i]
            ranks[i] = r
            A_rows[start : start + r] = pair.A
            Bt[i * R : i * R + r] = pair.B.t()
            scale[i] = pair.scale
    scale = tuple(scale)
    if scale not in scale_vectors:
        scale_vectors.append(scale)
    return LayerStacks(A, Bt, scale, torch.tensor(scale, dtype=torch.float32, device=device),
                       tuple(A_rows[i : i + R].t() for i in starts), tuple(Bt[i * R : i * R + R] for i in range(n)),
                       scale_vectors.index(scale), tuple(ranks), group, member)


def stacked_weights(stack_set: StackSet, layers: NamedLayers) -> dict[str, AdapterWeights]:
    """Per stacked adapter, its weights as views into the stacks (no copy)."""
    names = {id(layer): name for name, layer in layers}
    out: dict[str, dict[str, LoraPair]] = {key: {} for key in stack_set.keys}
    for layer, stacks in stack_set.layers:
        for i, key in enumerate(stack_set.keys):
            r = stacks.ranks[i]
            if r:
                out[key][names[id(layer)]] = LoraPair(stacks.At[i][:, :r].t(), stacks.Bts[i][:r].t(), stacks.scale[i])
    return {key: AdapterWeights(pairs) for key, pairs in out.items()}


def share_storage(stacked: dict[str, AdapterWeights], layers: NamedLayers) -> None:
    """Point peft's own A and B of every stacked adapter that peft holds at its views into the
    stacks (`stacked_weights`).

    Afterwards each such adapter's weights exist once, in the compute dtype (peft loads them in
    float32): the stacks are what the routed forward reads, and the views keep peft's state dict
    working on the same storage. (The engine never gives peft its adapters: it hands their
    weights to `LoraRouter.rebuild`, and the stacks are their only copy.)
    """
    for name, layer in layers:
        for key, weights in stacked.items():
            pair = weights.pairs.get(name)
            if pair is not None and key in layer.lora_A:
                layer.lora_A[key].weight.data = pair.A
                layer.lora_B[key].weight.data = pair.B


def row_mask(indices: tuple[int, ...], scale: tuple[float, ...], rank: int, device: torch.device,
             dtype: torch.dtype, mixes: tuple | None = None) -> torch.Tensor:
    """[items, 1, adapters·R]: item j keeps its own adapter's R columns, times that adapter's alpha/r;
    a mixed item (`RowPlan.mixes`) keeps each of its adapters' columns, times alpha/r and its scale."""
    n = len(scale)
    columns = torch.zeros(len(indices), n + 1, dtype=torch.float32)  # the last column: the base (and mixes)
    own = [n if i in (BASE, MIX) else i for i in indices]
    columns[torch.arange(len(indices)), torch.tensor(own)] = torch.tensor([*scale, 0.0])[own]
    for item, parts in enumerate(mixes or ()):
        for index, weight in parts or ():
            columns[item, index] += weight * scale[index]
    mask = columns[:, :n].repeat_interleave(rank, dim=1).unsqueeze(1)
    return mask.to(device=device, dtype=dtype)


def use_groups(device: torch.device, rows: int, columns: int) -> bool:
    """Whether a mixed step of `rows` rows computes each adapter's rows apart (the grouped path)
    rather than every adapter for every row (masked): on the CPU past KERNEL_MAX_ROWS rows, where
    the arithmetic dominates; on a GPU only past GPU_MASKED_MAX_ELEMENTS."""
    if device.type == "cpu":
        return rows > KERNEL_MAX_ROWS
    return rows * columns > GPU_MASKED_MAX_ELEMENTS


@dataclass(frozen=True)
class RowPlan:
    """What one forward computes, fixed when its rows are set: every adapted layer reads it."""

    indices: tuple[int, ...]
    """Per batch item, its adapter's index in the stacks (BASE: the base alone)."""
    stacks: StackSet
    step: int
    """Counts the router's plans: an input group's shared product is valid within one plan only."""
    shrink: Callable = torch.mm
    """The single path's `SHRINKS` function for this step."""
    per_row: bool = False
    """Every item's delta from its own products alone (the deterministic mode)."""
    item_indices: torch.Tensor = field(default_factory=lambda: torch.zeros(1, dtype=torch.long))
    """The kernel's view of the items: an index per item, or one index for all when they agree."""
    preset_masks: tuple[torch.Tensor, ...] | None = None
    """The masks already written into the router's fixed buffers (`LoraRouter.fix_masks`)."""
    mixes: tuple[tuple[tuple[int, float], ...] | None, ...] | None = None
    """Per batch item whose index is MIX, its (adapter index, scale) parts (None for the other
    items); None when no item mixes. A mixed item adds Σ scale·alpha/r·(x·Aᵀ)·B over its parts."""

    @functools.cached_property
    def single(self) -> int | None:
        """The one index every item uses (BASE: the base), or None when they differ or any item mixes."""
        return self.indices[0] if len(set(self.indices)) == 1 and self.mixes is None else None

    def parts(self, item: int) -> tuple[tuple[int, float], ...]:
        """The (adapter index, scale) pairs batch item `item` adds: none for the base."""
        index = self.indices[item]
        if index == MIX:
            return self.mixes[item]
        return () if index == BASE else ((index, 1.0),)

    @functools.cached_property
    def masks(self) -> tuple[torch.Tensor, ...]:
        """Per distinct scale vector, the masked path's [items, 1, adapters·R] mask; made on the
        first layer that needs it (the kernel does not)."""
        if self.preset_masks is not None:
            return self.preset_masks
        s = self.stacks
        return tuple(row_mask(self.indices, scale, s.rank, s.device, s.dtype, self.mixes) for scale in s.scale_vectors)

    @functools.cached_property
    def groups(self) -> tuple[tuple[int, torch.Tensor, torch.Tensor | None], ...]:
        """(index, the batch items that add it, their scales as [items, 1, 1] or None when all are 1)
        for every adapter in the rows."""
        by_index: dict[int, list[tuple[int, float]]] = {}
        for item in range(len(self.indices)):
            for index, weight in self.parts(item):
                by_index.setdefault(index, []).append((item, weight))
        device = self.stacks.device
        return tuple((index, torch.tensor([i for i, _ in pairs], device=device), _item_scales(pairs, device))
                     for index, pairs in by_index.items())

    def signature(self) -> tuple:
        """What the step computes beyond the rows' values: the base alone, one adapter's own
        blocks (which index), the masked mix, or, per row, the items' indices themselves (the
        per_row path loops over them on the host, so a captured step holds them). A captured
        step replays one of these."""
        if self.single == BASE:
            return ("base",)
        if self.single is not None:
            return ("single", self.single)
        if self.per_row:
            return ("per_row", self.indices) if self.mixes is None else ("per_row", self.indices, self.mixes)
        return ("mixed",)


def _item_scales(pairs: list[tuple[int, float]], device: torch.device) -> torch.Tensor | None:
    if all(weight == 1.0 for _, weight in pairs):
        return None
    return torch.tensor([weight for _, weight in pairs], dtype=torch.float32, device=device).view(-1, 1, 1)


def torch_path(plan: RowPlan, rows: int) -> Path:
    """The torch path a layer takes for `rows` input rows under `plan` (after the kernel, if any, declined)."""
    if plan.single == BASE:
        return Path.BASE
    if plan.per_row:
        return Path.PER_ROW
    if plan.single is not None:
        return Path.SINGLE
    if use_groups(plan.stacks.device, rows, plan.stacks.columns()):
        return Path.GROUPED
    return Path.MASKED


def _as_rows(x: torch.Tensor, stacks: LayerStacks) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.dtype == stacks.A.dtype else x2.to(stacks.A.dtype)


def _add_single(plan: RowPlan, stacks: LayerStacks, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """One adapter for every row: its own blocks, no mask."""
    x2, index = _as_rows(x, stacks), plan.single
    if stacks.group is not None:  # [rows, R]: this member's columns of the group's product
        hidden = stacks.group.shares(x, x2, index, plan.step, 0, plan.shrink)[stacks.member]
    else:
        hidden = plan.shrink(x2, stacks.At[index])
    return _add_product(result, hidden, stacks.Bts[index], stacks.scale[index])


def _add_masked(plan: RowPlan, stacks: LayerStacks, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """Every adapter's product for every row, each row keeping its own adapter's columns: fewest ops."""
    x2 = _as_rows(x, stacks)
    mask = plan.masks[stacks.mask_id]  # [batch, 1, adapters·R]
    if stacks.group is not None:
        own = stacks.group.shares(x, x2, None, plan.step, mask.shape[0])[stacks.member]  # [batch, seq, adapters, R]
        hidden = (own * mask.view(own.shape[0], 1, own.shape[2], own.shape[3])).view(x2.shape[0], -1)
    else:
        hidden = torch.mm(x2, stacks.A.t())
        hidden.view(mask.shape[0], -1, hidden.shape[-1]).mul_(mask)
    return _add_product(result, hidden, stacks.Bt, 1.0)


def _add_per_row(plan: RowPlan, stacks: LayerStacks, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """Each batch item's delta from products of that item alone, at its adapter's own rank: what
    a row gets depends on nothing else in the batch or among the resident adapters."""
    for item in range(len(plan.indices)):
        result = _add_item(stacks, x, result, item, plan.parts(item))
    return result


def _add_item(stacks: LayerStacks, x: torch.Tensor, result: torch.Tensor, item: int,
              parts: tuple[tuple[int, float], ...]) -> torch.Tensor:
    """Add batch item `item`'s delta, part by part, from products of that item alone at each
    adapter's own rank."""
    in_place = result.dtype == stacks.A.dtype and not torch.is_grad_enabled()
    for index, weight in parts:
        rank = stacks.ranks[index]
        if rank == 0:
            continue
        rows = x[item].reshape(-1, x.shape[-1]).to(stacks.A.dtype)  # [seq, in]
        delta = torch.mm(torch.mm(rows, stacks.At[index][:, :rank]), stacks.Bts[index][:rank])  # [seq, out]
        delta = delta.mul_(stacks.scale[index] * weight).view_as(result[item])
        if in_place:
            result[item].add_(delta)
        else:
            result = result.index_add(0, torch.tensor([item], device=result.device), delta.unsqueeze(0).to(result.dtype))
    return result


def _add_mixed_items(plan: RowPlan, stacks: LayerStacks, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """The mixed items' deltas, each from that item alone (after the kernel added the plain items')."""
    for item, parts in enumerate(plan.mixes):
        if parts:
            result = _add_item(stacks, x, result, item, parts)
    return result


def _add_grouped(plan: RowPlan, stacks: LayerStacks, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """For each adapter in the batch, the delta of its own batch items ([batch, ...] on dim 0):
    a few ops per adapter instead of every adapter's product for every row."""
    x = x.to(stacks.A.dtype)
    in_place = result.dtype == x.dtype and not torch.is_grad_enabled()
    for index, items, scales in plan.groups:
        hidden = torch.matmul(x.index_select(0, items), stacks.At[index])
        delta = torch.matmul(hidden, stacks.Bts[index])
        delta = (delta if scales is None else delta * scales.to(delta.dtype)).to(result.dtype)
        if in_place:
            result.index_add_(0, items, delta, alpha=stacks.scale[index])
        else:
            result = result.index_add(0, items, delta, alpha=stacks.scale[index])
    return result


def _add_nothing(plan: RowPlan, stacks: LayerStacks, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    return result


def _add_product(result: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, scale: float) -> torch.Tensor:
    """result + scale·hidden·weight, in place when nothing needs result's old value for a gradient."""
    if result.dtype != hidden.dtype or torch.is_grad_enabled():
        delta = torch.mm(hidden, weight).mul_(scale)
        return result + delta.view_as(result).to(result.dtype)
    result.view(-1, result.shape[-1]).addmm_(hidden, weight, alpha=scale)
    return result


PATHS: dict[Path, Callable[[RowPlan, LayerStacks, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    Path.BASE: _add_nothing, Path.SINGLE: _add_single, Path.MASKED: _add_masked,
    Path.GROUPED: _add_grouped, Path.PER_ROW: _add_per_row,
}
"""The torch paths' functions: (plan, the layer's stacks, its input, the base's output) -> output."""


def _routed_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    # Runs once per adapted layer per decode step, so it reaches the base layer's forward and
    # its own stacks through plain instance attributes (see LoraRouter._patch), and on the CPU
    # does its work in one kernel call.
    result = self._routed_base(x, *args, **kwargs)
    router: LoraRouter = self._router
    plan = router.plan
    if plan.single == BASE:
        return result
    stacks: LayerStacks = self._stacks
    # The kernel declines (False) what it does not take: other dtypes, strided rows, autograd,
    # and steps over `kernel_rows` rows (KERNEL_MAX_ROWS), where torch's blocked matrix products
    # are faster.
    if router.lora_add is not None and router.lora_add(result, x, stacks.A, stacks.Bt, plan.item_indices,
                                                       stacks.scale_t, plan.stacks.rank, router.kernel_rows):
        # The kernel saw mixed items as the base's; each one's parts are added from that item alone,
        # so the plain items' deltas are the kernel's whatever else the batch holds.
        return result if plan.mixes is None else _add_mixed_items(plan, stacks, x, result)
    return PATHS[torch_path(plan, x.numel() // x.shape[-1])](plan, stacks, x, result)


def _row_index(key: RowKey, index: dict[str, int]) -> int:
    if key is None:
        return BASE
    return MIX if isinstance(key, tuple) else index[key]


class LoraRouter:
    """Routes a peft model's adapted layers by a `RowPlan` over one `StackSet`: the settings
    below, the current stacks and plan, and the fixed mask buffers captured CUDA graphs read."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype | None = None, group_inputs: bool | None = None,
                 kernel: str = "auto", shrink: str = "auto", per_row: bool = False):
        self.check_kernel(kernel)
        if shrink not in SHRINK_CHOICES:
            raise ValueError(f"LoRA shrink {shrink!r}: expected one of {', '.join(SHRINK_CHOICES)}")
        self.model = model
        self.dtype = dtype
        """The stacks' dtype (the base's compute dtype); None keeps the adapters' own."""
        self.kernel = kernel
        """Which fused kernel adds the delta where it can (`KERNELS`)."""
        self.shrink = shrink
        """How the single path computes a row's `x·Aᵀ` (`SHRINK_CHOICES`); a new one takes effect at the next rebuild."""
        self.group_inputs = group_inputs
        """Share one A stack and input product among `PACKED_INPUTS` siblings (`InputGroup`). None:
        wherever the fused CPU kernel is not used (it reads each layer's own contiguous stack, and
        does a layer's work in one call anyway)."""
        self.per_row = per_row
        """Plans compute every row's delta from that row alone (the kernel where it applies, else
        the per_row path), never a product whose shape depends on the other rows: the
        deterministic mode's routing."""
        self.stacks = stack_adapters([], [], [], dtype)
        self._resident: dict[str, AdapterWeights] = {}
        """The stacked adapters' weights, views into `stacks` (`weights_of`)."""
        self.plan = RowPlan((BASE,), self.stacks, 0)
        self.lora_add = None
        """The fused kernel's entry point (`kernel`), where one applies; it declines what it does not take.
        Each rebuild sets it; between rebuilds a comparison may set another with the same contract (bench/)."""
        self.kernel_rows = 0
        """The most rows a step may have for `lora_add` to be tried."""
        self.version = 0
        """Counts rebuilds: a captured CUDA graph holds the stacks' addresses of the version it saw."""
        self._shrinks: tuple[Callable, Callable] = (torch.mm, torch.mm)
        """The `SHRINKS` functions for steps launched from Python and for replayed ones."""
        self._fixed_rows = 0
        self._fixed: list[torch.Tensor] = []
        """With `fix_masks`: per scale vector, a [rows, 1, adapters·R] buffer the row masks are written into."""

    @staticmethod
    def check_kernel(kernel: str) -> None:
        """Raise ValueError, naming the choice, for a kernel that is not one of `KERNELS`."""
        if kernel not in KERNELS:
            raise ValueError(f"LoRA kernel {kernel!r}: expected one of {', '.join(KERNELS)}")

    @property
    def keys(self) -> tuple[str, ...]:
        """The resident adapters' keys, in index order."""
        return self.stacks.keys

    @property
    def rank(self) -> int:
        return self.stacks.rank

    def layers(self) -> list[LoraLayer]:
        return [layer for _, layer in self.named_layers()]

    def named_layers(self) -> NamedLayers:
        """Every adapted layer, named as in the base model (peft's wrapper prefix removed)."""
        root = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return [(name, m) for name, m in root.named_modules() if isinstance(m, LoraLayer)]

    def rebuild(self, keys: list[str], loaded: Mapping[str, AdapterWeights] | None = None) -> None:
        """Stack the adapters `keys` (index i = keys[i]) in every adapted layer; patch new layers.

        Each key's weights come from `loaded` (newly read), else from the current stacks (it was
        resident), else from peft's own layers (an adapter peft loaded itself)."""
        loaded = loaded or {}
        layers = self.named_layers()
        weights = [loaded[k] if k in loaded else self._resident[k] if k in self._resident else peft_weights(layers, k)
                   for k in keys]
        device, dtype = _placement(layers, weights, self.dtype)
        grouping = self._pick_kernel(device, dtype)
        self.stacks = stack_adapters(layers, list(keys), weights, self.dtype, self._sibling_layers() if grouping else [])
        self._resident = stacked_weights(self.stacks, layers)
        share_storage(self._resident, layers)
        for layer, stacks in self.stacks.layers:
            if not hasattr(layer, "_router"):
                self._patch(layer)
            layer._stacks = stacks
        self._shrinks = tuple(SHRINKS[name] for name in self.shrink_names())
        self.plan = RowPlan((BASE,), self.stacks, self.plan.step + 1, self._shrinks[0], self.per_row)
        self._allocate_fixed()

    def weights_of(self, key: str) -> AdapterWeights:
        """A resident adapter's weights: views into the stacks (copy them to keep them past the next rebuild)."""
        return self._resident[key]

    def shrink_names(self) -> tuple[str, str]:
        """(eager, replayed) steps' shrinks, for the current stacks' device."""
        return auto_shrinks(self.stacks.device) if self.shrink == "auto" else (self.shrink, self.shrink)

    def _pick_kernel(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Set `lora_add` and `kernel_rows` for stacks on `device` in `dtype`; returns whether
        `PACKED_INPUTS` siblings are to share one A stack."""
        on_cpu_fp32 = device.type == "cpu" and dtype == torch.float32
        cpu_kernel = kernels.load() if self.kernel == "auto" and on_cpu_fp32 else None
        grouping = self.group_inputs if self.group_inputs is not None else cpu_kernel is None
        if cpu_kernel is not None and not grouping:  # it reads each layer's own contiguous stack only
            self.lora_add, self.kernel_rows = cpu_kernel.lora_add_, KERNEL_MAX_ROWS
        else:
            self.lora_add, self.kernel_rows = None, 0
        return grouping

    def fix_masks(self, rows: int) -> None:
        """Write row masks into fixed buffers of up to `rows` rows from now on, made when the rows
        are set: a captured step then reads the next rows' masks from the addresses it recorded.
        (Off by default: the masks are otherwise made on a step's first masked layer, if one needs them.)"""
        if rows != self._fixed_rows:
            self._fixed_rows = rows
            self._allocate_fixed()

    def _allocate_fixed(self) -> None:
        shape = (self._fixed_rows, 1, self.stacks.columns())
        self._fixed = [torch.zeros(shape, dtype=self.stacks.dtype, device=self.stacks.device)
                       for _ in self.stacks.scale_vectors] if self._fixed_rows else []
        self.version += 1

    def signature(self) -> tuple:
        """The current plan's `RowPlan.signature`."""
        return self.plan.signature()

    def _patch(self, layer: LoraLayer) -> None:
        """Route this layer's forward through the stacks.

        The base layer's forward is kept as a plain attribute and called directly: going through
        the submodule lookup and `nn.Module.__call__` again costs microseconds per layer per token,
        a measurable share of a small model's decode step. Only when the base layer has hooks of
        its own is it called as a module, so that they still run.
        """
        base = layer.get_base_layer()
        hooked = base._forward_hooks or base._forward_pre_hooks
        layer.__dict__["_routed_base"] = base if hooked else base.forward  # not registered as a submodule twice
        layer._router = self
        layer.forward = types.MethodType(_routed_forward, layer)

    def _sibling_layers(self) -> list[list[LoraLayer]]:
        """Adapted layers under one parent that `PACKED_INPUTS` names together, of one input
        width on one device: the candidates for an `InputGroup`."""
        children: dict[str, dict[str, LoraLayer]] = {}
        for name, module in self.model.named_modules():
            if isinstance(module, LoraLayer) and "." in name:
                parent, leaf = name.rsplit(".", 1)
                children.setdefault(parent, {})[leaf] = module
        found = []
        for leaves in children.values():
            for names in PACKED_INPUTS:
                members = [leaves[n] for n in names if n in leaves]
                kinds = {(m.get_base_layer().in_features, m.get_base_layer().weight.device) for m in members}
                if len(members) > 1 and len(kinds) == 1:
                    found.append(members)
        return found

    def set_rows(self, keys: list[RowKey], replayed: bool = False) -> RowPlan:
        """Plan the next forward: per batch item an adapter key, a mix ((key, scale), ...), or None
        routing it to the base. replayed: the forward is captured as a CUDA graph to be replayed, or
        is the run before such a capture (it must compute the same way), which may pick another shrink."""
        index = {key: i for i, key in enumerate(self.stacks.keys)}
        indices = tuple(_row_index(key, index) for key in keys)
        mixes = tuple(tuple((index[k], float(w)) for k, w in key) if isinstance(key, tuple) else None for key in keys)
        mixes = mixes if MIX in indices else None
        mixed = len(set(indices)) != 1 or mixes is not None
        preset = None
        if self._fixed and mixed and len(indices) <= self._fixed_rows:  # more: made as usual
            s = self.stacks
            for fixed, scale in zip(self._fixed, s.scale_vectors):
                fixed[: len(indices)].copy_(row_mask(indices, scale, s.rank, s.device, s.dtype, mixes))
            preset = tuple(fixed[: len(indices)] for fixed in self._fixed)
        # The kernel's view: one index per item (mixed items as the base's: their parts are added
        # apart), or one index for every row when they agree.
        kernel_view = tuple(BASE if i == MIX else i for i in indices)
        item_indices = torch.tensor(kernel_view if mixed else kernel_view[:1])
        self.plan = RowPlan(indices, self.stacks, self.plan.step + 1, self._shrinks[replayed], self.per_row,
                            item_indices, preset, mixes)
        return self.plan

    def path_for(self, rows: int) -> Path:
        """The path the current plan takes in a layer given `rows` input rows: the kernel where
        it is set and would take them (it may still decline a tensor), else a torch path."""
        if self.plan.single != BASE and self.lora_add is not None and rows <= self.kernel_rows:
            return Path.KERNEL
        return torch_path(self.plan, rows)
