"""LoRA adapters on one base model: a row pool per Linear layer, computed per step's plan.

Data structures (the Punica BGMV / S-LoRA idea, on any device):

- `LoraLayers` puts a `LoraLinear` in the place of every `nn.Linear` of the model but the
  LM head. Each has a **row pool**: `a_rows [P + 1, in]` and `b_rows [P + 1, out]` on the
  model's device and dtype, P = `capacity_rows` = `pool_bytes // bytes_per_row` (bytes_per_row
  = the sum over the wrapped layers of (in + out) * element size). Row 0 is all zeros, the
  target of every padding index. Siblings that read one input (q/k/v, gate/up) keep their
  A rows side by side in one `LoraShrink` (`[P + 1, members, in]`), which shrinks the input
  once for all of them; B rows are each layer's own.
- An adapter of rank r occupies r contiguous rows, the same in every layer (one allocator,
  `RowAllocator`, for all layers): its `Placement`. Row i holds A[i] and B[:, i] * scaling (B
  transposed, the scaling folded in), so a layer's LoRA output for the adapter at rows
  [s, s + r) is `x @ a_rows[s:s+r].T @ b_rows[s:s+r]`. A module of lower rank fills its first
  rows and zeros the rest; a layer the adapter does not target gets zeros. At most
  `max_adapters` are placed at once.
- Per step the runner sets `context.step`, one `LoraStep` plan (engine/lora_plan.py) that every
  layer follows. Which path computes it is fixed when the layers are made (`kernel`,
  EngineConfig.lora_kernel; `LoraLayers.kernel` is the loaded kernel or None):
  - **the CPU kernel** ("auto" on a CPU model, when engine/lora_kernel.py builds): the plan's
    `kernel` tables give every decode-like token its first pool row and rank, and one
    `add_lora_` call per layer adds all of them, each token reading its own adapter's rows
    where they lie (its own rank: no classes, no padding). With `prepack`, q/k/v and gate/up
    take that call once per group (`KernelFusedProjection`, beside their fused matmul), so a
    decoder layer makes 4 calls. Spans of one adapter heavy enough for a matmul to win
    (lora_plan.KERNEL_WORK tokens x rank, long prefill chunks) stay segments (below).
  - **torch ops** (CUDA, "torch", or no kernel): segments (long runs of one adapter: matmuls
    on views of its rows) and gathered rank classes (one batched shrink and one
    `embedding_bag` expand per class, however many adapters it mixes).
  An empty plan (a base-model step) costs nothing beyond the base matmul.

The base matmul is the layer's own (`PackedLinear`): with `prepack`, a oneDNN-packed copy of
the weight, and siblings that read one input (q/k/v, gate/up) share one packed matmul
(engine/fused_linear.py); LoRA adds in place into each member's columns of it.

Which adapters are placed, and when, is the adapter manager's business (engine/adapters.py: it
reads adapters with `read_adapter`, engine/lora_weights.py, and keeps the `placements` the
runner reads).

One step end to end: the runner orders chunks by `order_key`, builds the plan from each
chunk's token range and its adapter's Placement (for the path the layers have), sets
`context.step`, runs the model (each LoraLinear: base output, then the plan's LoRA added in
place: kernel tokens in one call, its group's when fused, then segments, then gathers), and
clears `context.step`.

Threads: `place` and `remove` run on the engine's worker
thread between steps, as does every forward; `read_adapter` may run on any thread.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from engine.fused_linear import FUSABLE_GROUPS, FusedProjection
from engine.lora_kernel import LoraKernel, kernel_for
from engine.lora_plan import LoraStep, Placement, rank_class
from engine.lora_weights import HostAdapter

__all__ = ["LoraLayers", "LoraLinear", "Placement", "RowAllocator", "fuse_siblings"]

EMBEDDING_BAG_SUM = 0  # torch.embedding_bag's mode
KERNEL_COLUMNS = (0,)  # a lone member's LoRA goes to column 0 of its own output
# Segments of at most this many tokens are computed in float32: on this CPU a bf16 matmul
# (oneDNN) costs about 40-60 us however small, a float32 one (MKL) about 5; the conversions
# of such a segment's tokens and rows are small. Measured: 32 decode rows of one adapter,
# 4-10 ms less per step (of about 95). Longer segments (prefill) stay in the model dtype.
SHORT_SEGMENT = 64


class LoraContext:
    """What the LoRA layers need to know about the current forward: the step's plan."""

    def __init__(self) -> None:
        self.step = LoraStep()


class PackedLinear(torch.nn.Linear):
    """A Linear layer sharing the base layer's parameters, optionally on a packed weight.

    With `prepack`, the matmul uses a copy of the weight in oneDNN's blocked layout: on this
    CPU (bf16) 1.6-1.9x faster than `F.linear` on weights that are not in cache, and bitwise
    equal to it. It costs the weight's memory again. Sibling layers that read the same input
    share one packed matmul (`fused`, engine/fused_linear.py)."""

    def __init__(self, base: torch.nn.Linear, prepack: bool = False):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.packed = torch.ops.mkldnn._reorder_linear_weight(base.weight.detach(), 16) if prepack else None
        self.fused: tuple[FusedProjection, int] | None = None  # (group, member index): see fuse_siblings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            group, member = self.fused
            return group.output(member, x)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class LoraShrink:
    """The A rows of sibling layers that read one input (q/k/v, gate/up, or a layer alone),
    and their shrink, computed once per input for all of them.

    `a_rows [P + 1, members, in]`: row p holds every member's A row p, so one gather (or one
    view, for a segment) and one matmul serve the whole group: on this CPU (bf16, 32 decode
    tokens of 32 adapters) the q/k/v shrink as one batched matmul took 0.11 ms against 0.07
    for one member's alone, since each call's fixed cost dominates. The first member called
    with a new input computes every member's part; each member then takes its own, and once
    all have, the group drops them (as engine/fused_linear.py does with the base output)."""

    def __init__(self, members: int, in_features: int, rows: int, dtype: torch.dtype, device: torch.device):
        self.members, self.in_features = members, in_features
        self.a_rows = torch.empty(rows + 1, members, in_features, dtype=dtype, device=device)
        self.a_rows[0].zero_()  # rows past 0 are written whole when placed (empty: untouched pages stay free)
        self._input: torch.Tensor | None = None
        self._parts: list[torch.Tensor] = []
        self._taken: set[int] = set()

    def parts(self, member: int, x: torch.Tensor, step: LoraStep) -> list[torch.Tensor]:
        """Member `member`'s shrink of `x` [tokens, in]: one [n, rank] part per segment, then
        one [n, width] part per gather, as `step` lists them (each contiguous)."""
        if self._input is not x or member in self._taken:  # `x` as the model passed it: siblings share it
            self._parts, self._input, self._taken = self._shrink(x.reshape(-1, self.in_features), step), x, set()
        parts = self._parts
        self._taken.add(member)
        if len(self._taken) == self.members:
            self._input, self._parts = None, []
        return [part[member] for part in parts]

    def _shrink(self, x: torch.Tensor, step: LoraStep) -> list[torch.Tensor]:
        """Every member's shrink, [members, n, rank or width] per segment and gather."""
        parts = []
        for seg in step.segments:
            tokens = x[seg.start : seg.stop]
            a = self.a_rows[seg.first_row : seg.first_row + seg.rank].view(-1, self.in_features)
            if seg.stop - seg.start <= SHORT_SEGMENT:
                tokens, a = tokens.float(), a.float()
            parts.append(self._by_member(tokens @ a.T, seg.rank))
        for g in step.gathers:
            tokens = x[g.start : g.stop]
            if g.gather is not None:
                tokens = tokens.index_select(0, g.gather)
            rows = self.a_rows[g.first_row : g.first_row + g.pieces * g.width] if g.rows is None else (
                self.a_rows.index_select(0, g.rows)
            )
            a = rows.view(g.pieces, g.width * self.members, self.in_features)
            shrunk = torch.bmm(tokens.view(g.pieces, g.length, self.in_features), a.transpose(1, 2))
            shrunk = shrunk.view(-1, g.width * self.members)
            if g.scatter is not None:
                shrunk = shrunk.index_select(0, g.scatter)
            parts.append(self._by_member(shrunk, g.width))
        return parts

    def _by_member(self, shrunk: torch.Tensor, width: int) -> torch.Tensor:
        """[n, width * members] (row j of member m in column j * members + m) -> [members, n, width]."""
        if self.members == 1:
            return shrunk.view(1, -1, width)
        return shrunk.view(-1, width, self.members).permute(2, 0, 1).contiguous()


class LoraLinear(PackedLinear):
    """A PackedLinear with B rows (`b_rows [P + 1, out]`) and a member's place in a LoraShrink,
    adding the LoRA of the step's plan (`context.step`) to its output in place."""

    def __init__(self, base: torch.nn.Linear, context: LoraContext, shrink: LoraShrink, member: int,
                 prepack: bool = False, kernel: LoraKernel | None = None):
        super().__init__(base, prepack)
        self.context, self.shrink, self.member, self.kernel = context, shrink, member, kernel
        rows = shrink.a_rows.shape[0]
        self.b_rows = torch.empty(rows, self.out_features, dtype=base.weight.dtype, device=base.weight.device)
        self.b_rows[0].zero_()
        self.group_kernel = False  # True: its KernelFusedProjection adds the kernel's LoRA (fuse_siblings)
        self._kernel_a = shrink.a_rows[:, member : member + 1]  # [P + 1, 1, in]: this member's A rows, for the kernel
        self._kernel_b = [self.b_rows]

    @property
    def a_rows(self) -> torch.Tensor:
        """This layer's A rows [P + 1, in] (a view into its shrink group's)."""
        return self.shrink.a_rows[:, self.member]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        step = self.context.step
        if step:
            self.add_lora(x, out, step)
        return out

    def add_lora(self, x: torch.Tensor, out: torch.Tensor, step: LoraStep) -> None:
        """out[t] += LoRA of token t (`x` [..., tokens, in], `out` [..., tokens, out], in place),
        as `step` says: the kernel's tokens in one call (unless this layer's fused group made
        it already); a segment's expand is one matmul on a view of its B rows (`addmm_`, or in
        float32 for a short one), a gather's one `embedding_bag` reading each token's B rows
        where they lie, weighted by its shrink."""
        if (k := step.kernel) is not None and not self.group_kernel:
            self.kernel.add_lora_(out, x, self._kernel_a, self._kernel_b, KERNEL_COLUMNS, k.first, k.rank, k.start)
        if not (step.segments or step.gathers):
            return
        out = out.view(-1, self.out_features)
        parts = iter(self.shrink.parts(self.member, x, step))
        for seg, shrunk in zip(step.segments, parts):
            b = self.b_rows[seg.first_row : seg.first_row + seg.rank]
            if shrunk.dtype == b.dtype:
                out[seg.start : seg.stop].addmm_(shrunk, b)
            else:  # a short segment, in float32 (SHORT_SEGMENT)
                out[seg.start : seg.stop].add_(shrunk @ b.float())
        for g, shrunk in zip(step.gathers, parts):
            expanded, *_ = torch.embedding_bag(  # F.embedding_bag's own call, without its per-call checks
                self.b_rows, g.token_rows, g.offsets, False, EMBEDDING_BAG_SUM, False, shrunk.reshape(-1), False, -1
            )
            out[g.start : g.stop].add_(expanded)

    def write_rows(self, start: int, rank: int, weights: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Rows [start, start + rank): the module's (A, B^T * scaling), zeros past its rank (or all)."""
        filled = 0
        a_rows = self.a_rows
        if weights is not None:
            a, b = weights
            filled = a.shape[0]
            a_rows[start : start + filled].copy_(a, non_blocking=True)
            self.b_rows[start : start + filled].copy_(b, non_blocking=True)
        a_rows[start + filled : start + rank].zero_()
        self.b_rows[start + filled : start + rank].zero_()


class RowAllocator:
    """First-fit allocation of contiguous runs among rows 1..capacity (row 0 stays zero)."""

    def __init__(self, capacity: int):
        self._runs: list[tuple[int, int]] = [(1, capacity)] if capacity > 0 else []  # free (start, count), sorted

    @property
    def free(self) -> int:
        return sum(count for _, count in self._runs)

    def take(self, count: int) -> int | None:
        """The start of `count` contiguous free rows, now taken; None when no run is long enough."""
        for i, (start, free) in enumerate(self._runs):
            if free >= count:
                self._runs[i : i + 1] = [(start + count, free - count)] if free > count else []
                return start
        return None

    def give(self, start: int, count: int) -> None:
        """Free rows [start, start + count), merged with free neighbours."""
        runs = sorted([*self._runs, (start, count)])
        merged = [runs[0]]
        for run_start, run_count in runs[1:]:
            last_start, last_count = merged[-1]
            if last_start + last_count == run_start:
                merged[-1] = (last_start, last_count + run_count)
            else:
                merged.append((run_start, run_count))
        self._runs = merged


class LoraLayers:
    """The model's LoRA layers and their shared row pool (module docstring).

    Thread rule: `place` and `remove` on the engine's worker thread, between steps."""

    def __init__(self, model: PreTrainedModel, pool_bytes: int, max_adapters: int, prepack: bool = False,
                 kernel: str = "auto"):
        """`kernel`: EngineConfig.lora_kernel ("auto": the CPU kernel when it builds; "torch")."""
        self.context = LoraContext()
        self.max_adapters = max_adapters
        targets, heads = _linear_layers(model)
        weight = next(iter(targets.values())).weight if targets else None
        self.kernel = kernel_for(kernel, weight.device, weight.dtype) if weight is not None else None
        self.linear_shapes = {name: (m.in_features, m.out_features) for name, m in targets.items()}
        self.bytes_per_row = sum((m.in_features + m.out_features) * m.weight.element_size() for m in targets.values())
        self.capacity_rows = pool_bytes // self.bytes_per_row if self.bytes_per_row else 0
        self.layers: dict[str, LoraLinear] = {}
        for names in _shrink_groups(model, targets):
            first = targets[names[0]].weight
            shrink = LoraShrink(len(names), targets[names[0]].in_features, self.capacity_rows, first.dtype, first.device)
            for member, name in enumerate(names):
                self.layers[name] = LoraLinear(targets[name], self.context, shrink, member, prepack, self.kernel)
                model.set_submodule(name, self.layers[name])
        if prepack:
            for name, base in heads.items():
                model.set_submodule(name, PackedLinear(base, prepack))
            fuse_siblings(model)
        self._rows = RowAllocator(self.capacity_rows)
        self._placed: set[Placement] = set()

    @property
    def free_rows(self) -> int:
        return self._rows.free

    def place(self, adapter: HostAdapter) -> Placement | None:
        """Copy the adapter into a contiguous run of free rows; None when no run or no slot is
        free (the caller evicts another adapter and retries; nothing is evicted here)."""
        if unknown := adapter.weights.keys() - self.layers.keys():
            raise ValueError(f"adapter {adapter.name!r} has weights for layers this model lacks: {sorted(unknown)[:3]}")
        if len(self._placed) >= self.max_adapters:
            return None
        start = self._rows.take(adapter.rank)
        if start is None:
            return None
        for name, layer in self.layers.items():
            layer.write_rows(start, adapter.rank, adapter.weights.get(name))
        placement = Placement(start, adapter.rank, rank_class(adapter.rank))
        self._placed.add(placement)
        return placement

    def remove(self, placement: Placement) -> None:
        """Free the adapter's rows; no step may use them after this. They keep their values
        until a later `place` writes all of them (nothing reads rows outside a placement)."""
        self._placed.remove(placement)
        self._rows.give(placement.start, placement.rank)


def _linear_layers(model: PreTrainedModel) -> tuple[dict[str, torch.nn.Linear], dict[str, torch.nn.Linear]]:
    """({name: layer} of the plain Linear layers that take LoRA, {name: layer} of the LM heads)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets, heads = {}, {}
    for name, module in model.named_modules():
        if type(module) is torch.nn.Linear:
            is_head = module is head or name.rsplit(".", 1)[-1] == "lm_head"
            (heads if is_head else targets)[name] = module
    return targets, heads


def _shrink_groups(model: torch.nn.Module, targets: dict[str, torch.nn.Linear]) -> list[list[str]]:
    """Names of the target layers, grouped as siblings that read one input (FUSABLE_GROUPS,
    alike in input size, dtype and device); every other layer alone."""
    groups, grouped = [], set()
    for parent_name, parent in model.named_modules():
        prefix = f"{parent_name}." if parent_name else ""
        for names in FUSABLE_GROUPS:
            full = [prefix + name for name in names]
            members = [targets.get(name) for name in full]
            if all(m is not None for m in members) and FusedProjection.can_fuse(members):
                groups.append(full)
                grouped.update(full)
    return groups + [[name] for name in targets if name not in grouped]


def fuse_siblings(model: torch.nn.Module) -> None:
    """Give each group of packed sibling layers (q/k/v, gate/up: FUSABLE_GROUPS) one matmul
    (engine/fused_linear.py); the members' own packed copies are dropped. A group that is one
    LoraShrink's members, with the kernel, also gets its kernel LoRA in one call
    (KernelFusedProjection)."""
    for parent in model.modules():
        for names in FUSABLE_GROUPS:
            members = [getattr(parent, name, None) for name in names]
            if not all(isinstance(m, PackedLinear) and m.packed is not None for m in members):
                continue
            if not FusedProjection.can_fuse(members):
                continue
            if KernelFusedProjection.fits(members):
                group = KernelFusedProjection(members)
            else:
                group = FusedProjection([m.weight for m in members], [m.bias for m in members])
            for index, member in enumerate(members):
                member.fused, member.packed = (group, index), None
                if isinstance(group, KernelFusedProjection):
                    member.group_kernel = True


class KernelFusedProjection(FusedProjection):
    """The fused matmul of LoRA siblings that also adds, as it computes the group's output,
    every member's LoRA of the step's kernel tokens: one kernel call for q/k/v (or gate/up)
    instead of one per member, each member's into its own columns. Segments and gathers stay
    per member (LoraLinear.add_lora)."""

    def __init__(self, members: list[LoraLinear]):
        super().__init__([m.weight for m in members], [m.bias for m in members])
        first = members[0]
        self.context, self.kernel, self.a_rows = first.context, first.kernel, first.shrink.a_rows
        self.b_rows = [m.b_rows for m in members]
        self.starts = [start for start, _ in self.columns]

    @staticmethod
    def fits(members: list[PackedLinear]) -> bool:
        """Members that are, in order, all of one LoraShrink's members, with the kernel."""
        return (
            len(members) > 1 and all(isinstance(m, LoraLinear) and m.kernel is not None for m in members)
            and all(m.shrink is members[0].shrink and m.member == i for i, m in enumerate(members))
            and members[0].shrink.members == len(members)
        )

    def output(self, member: int, x: torch.Tensor) -> torch.Tensor:
        fresh = self._input is not x or member in self._taken  # the base class computes the group's output now
        out = super().output(member, x)
        if fresh and (k := self.context.step.kernel) is not None:
            self.kernel.add_lora_(self._output, x, self.a_rows, self.b_rows, self.starts, k.first, k.rank, k.start)
        return out
