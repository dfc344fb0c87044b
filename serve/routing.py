"""Per-row LoRA routing with stacked weights (the S-LoRA/Punica idea).

peft's `adapter_names` path loops over the batch's adapters in every adapted layer; on a small
model those Python-level steps cost more than the arithmetic. Here each adapted layer keeps its
resident adapters' A and B stacked, A as [slots·R, in] and Bᵀ as [slots·R, out] (ranks
zero-padded to the largest, R; slot s owns rows s·R .. s·R+R of both), and one step costs the
same few operations per layer however many adapters the batch mixes:

- on the CPU in float32, one call of a fused kernel (`serve/kernels`) that computes each row's
  `scale·(x·Aₛᵀ)·Bₛ` for its own slot s and adds it to the base layer's output;
- otherwise (a GPU, other dtypes, long prefills) torch ops: when every row uses one adapter, two
  matrix products with that slot's own blocks (for a single row in a step replayed from a CUDA
  graph, the first is a compiled reduction: `SHRINKS`, `auto_shrinks`); when rows mix adapters,
  `h = x·Aᵀ` for every slot at once, `h *= mask` (each row keeps its own slot's columns, times
  its alpha/r), `y += h·Bᵀ`.

When every row uses the base, nothing is added. The stacks are the only copy of the adapters'
weights on the device: peft's own A and B are views into them.

Layers handed the same input (q/k/v, gate/up: `PACKED_INPUTS`) share one A stack on the torch
paths, so `x·Aᵀ` is one product for the group rather than one per layer (vLLM packs its q/k/v
LoRA the same way): a Llama block's adapter kernels at batch 1 go from 14 to 11, and a GPU's
decode step is set by how many kernels it launches.

Only the engine uses this, under its lock; the rows are set before each forward. A routed
model ignores peft's active-adapter state (`set_adapter`, `disable_adapter`): the rows decide.
Plain LoRA on linear layers only: the registry refuses what this cannot compute (DoRA,
embedding LoRA, modules_to_save).
"""

from __future__ import annotations

import functools
import importlib.util
import types
from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer

from serve import kernels

KERNEL_MAX_ROWS = 64
"""Above this many rows (a long prefill) torch's blocked matrix products beat the row-at-a-time kernel."""

GPU_MASKED_MAX_ELEMENTS = 1 << 24
"""On a GPU a mixed step takes the masked path (every slot's product for every row, three kernels
per layer) unless its [rows, slots·R] hidden tensor would pass this many elements (32 MiB in bf16).
Grouping launches about five kernels per adapter per layer, and on a GPU at these sizes the
launches, not the arithmetic, set the time; at the bound the masked path's extra arithmetic is
still a few percent of the base's own."""

KERNELS = ("auto", "torch")
"""`LoraRouter`'s kernel choices: auto (the fused CPU kernel for float32 on the CPU, torch ops
elsewhere), torch (torch ops everywhere). (A Triton kernel for GPU decode steps lost to the torch
ops on an H100 and left for bench/: docs/history/triton-lora-kernel.md.)"""

BASE = -1
"""`LoraRouter.single` when every row uses the base alone."""


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
"""How the one-adapter path computes `x·Aᵀ` ([rows, in] times one slot's [in, R] block, a
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
    product `x·Aᵀ` serves all of them, each reading its own R columns per slot."""

    def __init__(self, A: torch.Tensor, members: int, rank: int):
        self.A = A
        """[slots·M·R, in]: slot s, member m owns rows (s·M + m)·R .. (s·M + m)·R + R."""
        self.members, self.rank = members, rank
        self.slots = A.shape[0] // (members * rank)
        self.At = [A[i : i + members * rank].t() for i in range(0, A.shape[0], members * rank)]
        """Per slot, its [in, M·R] block of Aᵀ."""
        self.clear()

    def clear(self) -> None:
        self._x, self._shares, self._rows_set, self._version, self._left = None, (), -1, -1, 0

    def shares(self, x: torch.Tensor, x2: torch.Tensor, slot: int | None, rows_set: int, batch: int,
               shrink=torch.mm) -> tuple:
        """Each member's share of `x2·Aᵀ`: with one slot for every row, [rows, R] per member (the
        product computed by `shrink`, a `SHRINKS` function); with mixed rows (slot None), [batch,
        seq, slots, R] per member, every slot's columns. Computed
        by the first member to see `x` in a step and kept until every member has had its share,
        only for the same tensor, unchanged (its version), in the same step (`rows_set`, which
        `LoraRouter.set_rows` counts): anything else recomputes."""
        version = -2 if x.is_inference() else x._version  # inference tensors keep no version counter
        if not (self._x is x and self._version == version and self._rows_set == rows_set):
            if slot is not None:
                self._shares = shrink(x2, self.At[slot]).split(self.rank, dim=1)
            else:
                hidden = torch.mm(x2, self.A.t())  # [rows, slots·M·R]
                self._shares = hidden.view(batch, -1, self.slots, self.members, self.rank).unbind(3)
            self._x, self._version, self._rows_set, self._left = x, version, rows_set, self.members
        shares = self._shares
        self._left -= 1
        if self._left == 0:  # every member has had its share: hold neither the input nor the product
            self.clear()
        return shares


@dataclass
class LayerStacks:
    """One adapted layer's resident adapters, and the per-slot views the one-adapter path uses."""

    A: torch.Tensor
    """[slots·R, in]; slot s owns rows s·R .. s·R + r_s (the rest of its R rows are zero). In a
    group: [slots, R, in], a view into the group's stack."""
    Bt: torch.Tensor
    """[slots·R, out]: B transposed, the same rows per slot."""
    scale: tuple[float, ...]
    """alpha/r per slot."""
    scale_t: torch.Tensor
    """The same as a float32 tensor on the layer's device, for the kernels."""
    At: list[torch.Tensor]
    """Per slot, its [in, R] block of Aᵀ (a view)."""
    Bts: list[torch.Tensor]
    """Per slot, its [R, out] block of Bᵀ (a view)."""
    mask_id: int
    """Which of the router's row masks fits this layer's scales (layers sharing scales share one)."""
    group: InputGroup | None = None
    """The siblings this layer shares its A stack and input product with; A is then a
    [slots, R, in] view into the group's stack."""
    member: int = 0
    """This layer's place in its group."""
    ranks: tuple[int, ...] = ()
    """Each slot's own rank in this layer (0 where its adapter does not adapt it)."""


def _routed_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    # Runs once per adapted layer per decode step, so it reaches the base layer's forward and
    # its own state through plain instance attributes (see LoraRouter._patch), and on the CPU
    # does its work in one kernel call.
    result = self._routed_base(x, *args, **kwargs)
    router: LoraRouter = self._router
    if router.single == BASE:
        return result
    stacks: LayerStacks = self._stacks
    # The kernel declines (False) what it does not take: other dtypes, strided rows, autograd,
    # and steps over `kernel_rows` rows (KERNEL_MAX_ROWS), where torch's blocked matrix products
    # are faster.
    if router.lora_add is not None and router.lora_add(result, x, stacks.A, stacks.Bt, router.item_slots,
                                                       stacks.scale_t, router.rank, router.kernel_rows):
        return result
    if router.per_row:
        return _add_per_row(router, stacks, x, result)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.dtype != stacks.A.dtype:
        x2 = x2.to(stacks.A.dtype)
    slot = router.single
    if slot is not None:  # one adapter for every row: its own blocks, no mask
        if stacks.group is not None:  # [rows, R]: this member's columns of the group's product
            hidden = stacks.group.shares(x, x2, slot, router.rows_set, 0, router.shrink_product)[stacks.member]
        else:
            hidden = router.shrink_product(x2, stacks.At[slot])
        return _add_product(result, hidden, stacks.Bts[slot], stacks.scale[slot])
    if router.use_groups(x2.shape[0]):  # a long mixed prefill: each adapter's own rows only
        return _add_grouped(router, stacks, x.to(x2.dtype), result)
    mask = router.mask(stacks.mask_id)  # [batch, 1, slots·R]
    if stacks.group is not None:
        own = stacks.group.shares(x, x2, None, router.rows_set, mask.shape[0])[stacks.member]  # [batch, seq, slots, R]
        hidden = (own * mask.view(own.shape[0], 1, own.shape[2], own.shape[3])).view(x2.shape[0], -1)
    else:
        hidden = torch.mm(x2, stacks.A.t())  # short steps: every slot at once, fewest ops
        hidden.view(mask.shape[0], -1, hidden.shape[-1]).mul_(mask)
    return _add_product(result, hidden, stacks.Bt, 1.0)


def _add_per_row(router: "LoraRouter", stacks: LayerStacks, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """Each batch item's delta from products of that item alone, at its adapter's own rank: what
    a row gets depends on nothing else in the batch or among the resident adapters."""
    in_place = result.dtype == stacks.A.dtype and not torch.is_grad_enabled()
    for item, slot in enumerate(router.row_slots()):
        rank = stacks.ranks[slot] if slot != BASE else 0
        if rank == 0:
            continue
        rows = x[item].reshape(-1, x.shape[-1]).to(stacks.A.dtype)  # [seq, in]
        delta = torch.mm(torch.mm(rows, stacks.At[slot][:, :rank]), stacks.Bts[slot][:rank])  # [seq, out]
        delta = delta.mul_(stacks.scale[slot]).view_as(result[item])
        if in_place:
            result[item].add_(delta)
        else:
            result = result.index_add(0, torch.tensor([item], device=result.device), delta.unsqueeze(0).to(result.dtype))
    return result


def _add_grouped(router: "LoraRouter", stacks: LayerStacks, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """For each adapter in the batch, the delta of its own batch items ([batch, ...] on dim 0):
    a few ops per adapter instead of every slot's product for every row."""
    in_place = result.dtype == x.dtype and not torch.is_grad_enabled()
    for slot, items in router.groups():
        hidden = torch.matmul(x.index_select(0, items), stacks.At[slot])
        delta = torch.matmul(hidden, stacks.Bts[slot]).to(result.dtype)
        if in_place:
            result.index_add_(0, items, delta, alpha=stacks.scale[slot])
        else:
            result = result.index_add(0, items, delta, alpha=stacks.scale[slot])
    return result


def _add_product(result: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, scale: float) -> torch.Tensor:
    """result + scale·hidden·weight, in place when nothing needs result's old value for a gradient."""
    if result.dtype != hidden.dtype or torch.is_grad_enabled():
        delta = torch.mm(hidden, weight).mul_(scale)
        return result + delta.view_as(result).to(result.dtype)
    result.view(-1, result.shape[-1]).addmm_(hidden, weight, alpha=scale)
    return result


class LoraRouter:
    def __init__(self, model: torch.nn.Module, dtype: torch.dtype | None = None, group_inputs: bool | None = None,
                 kernel: str = "auto", shrink: str = "auto", per_row: bool = False):
        self.check_kernel(kernel)
        self.per_row = per_row
        """Compute every row's delta from that row alone (the fused kernel where it applies, else
        `_add_per_row`), never a product whose shape depends on the other rows: the
        deterministic mode's routing."""
        if shrink not in SHRINK_CHOICES:
            raise ValueError(f"LoRA shrink {shrink!r}: expected one of {', '.join(SHRINK_CHOICES)}")
        self.model = model
        self.kernel = kernel
        """Which fused kernel adds the delta where it can (`KERNELS`)."""
        self.shrink = shrink
        """How the torch path's one-adapter steps compute a row's `x·Aᵀ` (`SHRINK_CHOICES`)."""
        self._shrink_products: tuple = (None, None)
        """The `SHRINKS` functions for steps launched from Python and for replayed ones: set by
        each rebuild (so a new `shrink` takes effect at the next)."""
        self.shrink_product = None
        """The one the current rows use (`set_rows`)."""
        self.dtype = dtype
        """The stacks' dtype (the base's compute dtype); None keeps the adapters' own."""
        self.group_inputs = group_inputs
        """Share one A stack and input product among `PACKED_INPUTS` siblings (`InputGroup`). None:
        wherever the fused CPU kernel is not used (it reads each layer's own contiguous stack, and
        does a layer's work in one call anyway)."""
        self._input_groups: list[InputGroup] = []
        self.rows_set = 0
        """Counts `set_rows` calls: an input group's product is kept within one set of rows only."""
        self.keys: list[str] = []
        self.rank = 1
        """R: every slot's rank, padded to the largest resident one."""
        self.single: int | None = BASE
        """The one slot every row uses, when they all use the same (BASE: the base alone)."""
        self.item_slots = torch.zeros(1, dtype=torch.long)
        """The kernel's view of the rows: a slot per batch item (-1: the base), or one slot for all."""
        self._slots: list[int] = []
        self._groups: list[tuple[int, torch.Tensor]] | None = None
        self._masks: list[torch.Tensor] | None = None
        """Per distinct scale vector, [batch, 1, slots·R]: each row's own slot's columns times its
        alpha/r; made on the first forward of a step that needs them (the kernel does not)."""
        self.lora_add = None
        """The fused kernel's entry point (`kernel`), where one applies; it declines what it does not take.
        Each rebuild sets it; between rebuilds a comparison may set another with the same contract (bench/)."""
        self.kernel_rows = 0
        """The most rows a step may have for `lora_add` to be tried."""
        self._scale_vectors: list[tuple[float, ...]] = []
        self._device, self._dtype = torch.device("cpu"), torch.float32
        """Where and in what dtype the stacks live (the masks must match)."""
        self.version = 0
        """Counts rebuilds: a captured CUDA graph holds the stacks' addresses of the version it saw."""
        self._fixed_rows = 0
        self._fixed: list[torch.Tensor] = []
        """With `fix_masks`: per scale vector, a [rows, 1, slots·R] buffer the row masks are written into."""

    @staticmethod
    def check_kernel(kernel: str) -> None:
        """Raise ValueError, naming the choice, for a kernel that is not one of `KERNELS`."""
        if kernel not in KERNELS:
            raise ValueError(f"LoRA kernel {kernel!r}: expected one of {', '.join(KERNELS)}")

    def layers(self) -> list[LoraLayer]:
        return [m for m in self.model.modules() if isinstance(m, LoraLayer)]

    def rebuild(self, keys: list[str]) -> None:
        """Stack the weights of `keys` (slot i = keys[i]) in every adapted layer; patch new layers."""
        self.keys = list(keys)
        layers = self.layers()
        self.rank = max([layer.r[k] for layer in layers for k in self.keys if k in layer.lora_A], default=1)
        self._scale_vectors = []
        self._device, self._dtype = self._placement(layers)
        self._shrink_products = tuple(SHRINKS[name] for name in self.shrink_names())
        self.shrink_product = self._shrink_products[0]
        grouping = self._pick_kernel()
        place: dict[int, tuple[InputGroup, int]] = {}  # id(layer) -> (its group, its place in it)
        self._input_groups = []
        for members in self._sibling_layers() if grouping else []:
            group = self._group_stack(members)
            self._input_groups.append(group)
            place.update({id(layer): (group, m) for m, layer in enumerate(members)})
        for layer in layers:
            if not hasattr(layer, "_router"):
                self._patch(layer)
            layer._stacks = self._stack(layer, *place.get(id(layer), (None, 0)))
        self.single, self._slots, self._masks, self._groups = BASE, [], None, None
        self._allocate_fixed()

    def shrink_names(self) -> tuple[str, str]:
        """(eager, replayed) steps' shrinks, for stacks on `_device`."""
        return auto_shrinks(self._device) if self.shrink == "auto" else (self.shrink, self.shrink)

    def _pick_kernel(self) -> bool:
        """Set `lora_add` and `kernel_rows` for the stacks about to be built (on `_device`, in
        `_dtype`); returns whether `PACKED_INPUTS` siblings are to share one A stack."""
        on_cpu_fp32 = self._device.type == "cpu" and self._dtype == torch.float32
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
        (Off by default: the masks are otherwise made on a step's first mixed layer, if one needs them.)"""
        if rows != self._fixed_rows:
            self._fixed_rows = rows
            self._allocate_fixed()

    def _allocate_fixed(self) -> None:
        shape = (self._fixed_rows, 1, len(self.keys) * self.rank)
        self._fixed = [torch.zeros(shape, dtype=self._dtype, device=self._device)
                       for _ in self._scale_vectors] if self._fixed_rows else []
        self.version += 1

    def signature(self) -> tuple:
        """What a step computes for the current rows beyond their values: the base alone, one
        adapter's own blocks (which slot), or the masked mix. A captured step replays one of these."""
        if self.single == BASE:
            return ("base",)
        return ("mixed",) if self.single is None else ("single", self.single)

    def _placement(self, layers: list[LoraLayer]) -> tuple[torch.device, torch.dtype]:
        """The masks' device (the adapters') and the stacks' dtype: the compute dtype, or the adapters' own."""
        ref = next((layer.lora_A[k].weight for layer in layers for k in self.keys if k in layer.lora_A), None)
        if ref is None:
            return torch.device("cpu"), self.dtype or torch.float32
        return ref.device, self.dtype or ref.dtype

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

    def _group_stack(self, members: list[LoraLayer]) -> InputGroup:
        base = members[0].get_base_layer()
        rows = len(self.keys) * len(members) * self.rank
        A = torch.zeros(rows, base.in_features, dtype=self._dtype, device=base.weight.device)
        return InputGroup(A, len(members), self.rank)

    def _stack(self, layer: LoraLayer, group: InputGroup | None = None, member: int = 0) -> LayerStacks:
        """Stack the resident adapters of one layer (its A in its group's stack, if it has a group),
        then point peft's own A and B at the stacks.

        Afterwards each adapter's weights exist once, in the compute dtype (peft loads them in
        float32): the stacks are what the routed forward reads, and the views keep peft's state
        dict (eviction to host memory) working on the same storage.
        """
        base = layer.get_base_layer()
        R, slots = self.rank, len(self.keys)
        device = base.weight.device  # the layer's own: a model split across devices keeps each layer's stacks beside it
        if group is None:
            A = torch.zeros(slots * R, base.in_features, dtype=self._dtype, device=device)
            starts = [slot * R for slot in range(slots)]
        else:  # slot s's block for this member: rows (s·M + member)·R of the group's stack
            A = group.A.view(slots, group.members, R, base.in_features)[:, member]  # [slots, R, in]
            starts = [(slot * group.members + member) * R for slot in range(slots)]
        A_rows = A if group is None else group.A  # [rows, in] either way; `starts` index it
        Bt = torch.zeros(slots * R, base.out_features, dtype=self._dtype, device=device)
        scale, ranks = [0.0] * slots, [0] * slots
        for slot, key in enumerate(self.keys):
            if key in layer.lora_A:
                r, start = layer.r[key], starts[slot]
                ranks[slot] = r
                A_rows[start : start + r] = layer.lora_A[key].weight.detach()
                Bt[slot * R : slot * R + r] = layer.lora_B[key].weight.detach().t()
                layer.lora_A[key].weight.data = A_rows[start : start + r]
                layer.lora_B[key].weight.data = Bt[slot * R : slot * R + r].t()
                scale[slot] = float(layer.scaling[key])
        scale = tuple(scale)
        if scale not in self._scale_vectors:
            self._scale_vectors.append(scale)
        return LayerStacks(A, Bt, scale, torch.tensor(scale, dtype=torch.float32, device=device),
                           [A_rows[i : i + R].t() for i in starts], [Bt[i * R : i * R + R] for i in range(slots)],
                           self._scale_vectors.index(scale), group, member, tuple(ranks))

    def set_rows(self, keys: list[str | None], replayed: bool = False) -> None:
        """One adapter key per row of the next forward; None routes the row to the base.
        replayed: the forward is captured as a CUDA graph to be replayed, or is the run before
        such a capture (it must compute the same way), which may pick another shrink."""
        self.shrink_product = self._shrink_products[replayed]
        slot = {key: i for i, key in enumerate(self.keys)}
        slots = [BASE if key is None else slot[key] for key in keys]
        self._slots, self._masks, self._groups = slots, None, None
        self.rows_set += 1  # input groups recompute their products for the new rows
        self.single = slots[0] if len(set(slots)) == 1 else None
        self.item_slots = torch.tensor(slots if self.single is None else slots[:1])  # one item: every row
        if self._fixed and self.single is None and len(slots) <= self._fixed_rows:  # more: made as usual
            for fixed, scale in zip(self._fixed, self._scale_vectors):
                fixed[: len(slots)].copy_(self._make_mask(scale))
            self._masks = [fixed[: len(slots)] for fixed in self._fixed]

    def row_slots(self) -> list[int]:
        """The current rows' slots, one per batch item (BASE: the base alone)."""
        return self._slots

    def use_groups(self, rows: int) -> bool:
        """Whether a mixed step of `rows` rows computes each adapter's rows apart (`_add_grouped`)
        rather than every slot for every row: on the CPU past KERNEL_MAX_ROWS rows, where the
        arithmetic dominates; on a GPU only past GPU_MASKED_MAX_ELEMENTS."""
        if self._device.type == "cpu":
            return rows > KERNEL_MAX_ROWS
        return rows * len(self.keys) * self.rank > GPU_MASKED_MAX_ELEMENTS

    def groups(self) -> list[tuple[int, torch.Tensor]]:
        """(slot, the batch items that use it) for every adapter in the current rows."""
        if self._groups is None:
            by_slot: dict[int, list[int]] = {}
            for item, slot in enumerate(self._slots):
                if slot != BASE:
                    by_slot.setdefault(slot, []).append(item)
            self._groups = [(slot, torch.tensor(items, device=self._device)) for slot, items in by_slot.items()]
        return self._groups

    def mask(self, mask_id: int) -> torch.Tensor:
        """The current rows' mask for layers whose scales are the `mask_id`th distinct vector."""
        if self._masks is None:
            self._masks = [self._make_mask(scale) for scale in self._scale_vectors]
        return self._masks[mask_id]

    def _make_mask(self, scale: tuple[float, ...]) -> torch.Tensor:
        """[rows, 1, slots·R]: row i keeps its own slot's R columns, times that slot's alpha/r."""
        slots = self._slots
        columns = torch.zeros(len(slots), len(self.keys) + 1, dtype=torch.float32)  # the last column: the base
        own = [len(self.keys) if s == BASE else s for s in slots]
        columns[torch.arange(len(slots)), torch.tensor(own)] = torch.tensor([*scale, 0.0])[own]
        mask = columns[:, : len(self.keys)].repeat_interleave(self.rank, dim=1).unsqueeze(1)
        return mask.to(device=self._device, dtype=self._dtype)
