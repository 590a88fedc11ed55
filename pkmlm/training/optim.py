"""Optimizers: Adam for the network, a row-wise lazy Adam for memory value tables, the lr schedule.

`make_optimizers` is the one place that decides which parameter goes where, so every training loop
routes them the same way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from pkmlm.distributed import set_where_
from pkmlm.memory import ProductKeyMemory, kernels
from pkmlm.memory.sparse import summed_rows
from pkmlm.memory.values_file import file_of


class RowAdam(torch.optim.Optimizer):
    """Adam for row-sparse gradients (memory value tables): it reads and writes only the touched rows.

    Semantics ("lazy", per row): each row is an independent Adam parameter that takes a step only when
    the gradient touches it. A row that is not read in a step keeps its weights, moments and step
    count unchanged (no decay of its moments). Bias correction uses the row's own step count, so a
    row's k-th update equals dense Adam's k-th update on the sequence of gradients that row received.
    (`torch.optim.SparseAdam` differs: one global step count per tensor, so a row first touched late
    gets a smaller first update.) `reset_state(param, rows)` makes given rows start afresh.

    Gradients must be sparse (`nn.EmbeddingBag(..., sparse=True)`); duplicate indices are summed.
    Per-step cost is O(touched rows * row size); state is "moments" (rows, 2, ...) (Adam's first and
    second moment of each row, side by side) plus "step", one int64 count per row.
    """

    CPU_ROW_CHUNK = 1024  # rows updated per pass on the CPU

    def __init__(self, params: Iterable[nn.Parameter], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        _check_adam_args(lr, betas, eps)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                rows, g = summed_rows(p.grad)
                state = self.state[p]
                values_file = file_of(p)
                if values_file is not None:  # state in the files; old rows journaled before they change
                    state.update(moments=values_file.moments, step=values_file.step)
                    values_file.before_update(rows)
                if not state:
                    # Both moments in one (rows, 2, ...) tensor: one gather and one scatter per step.
                    state["moments"] = torch.zeros((p.shape[0], 2) + p.shape[1:], dtype=p.dtype, device=p.device)
                    state["step"] = torch.zeros(p.shape[0], dtype=torch.long, device=p.device)
                if p.dim() == 2 and p.is_contiguous() and kernels.usable(p, g):
                    # One fused pass per row (pkmlm.memory.kernels), same arithmetic as _update_rows.
                    torch.ops.pkmlm.row_adam_(p.detach(), state["moments"], state["step"], rows.contiguous(),
                                              g.contiguous(), group["lr"], *group["betas"], group["eps"])
                    continue
                # Otherwise: on the CPU, rows in chunks: each chunk's gathered rows and temporaries stay in cache
                # (measured: about 1.5x faster at 1M slots than one pass). A GPU prefers one launch.
                size = self.CPU_ROW_CHUNK if p.device.type == "cpu" else max(rows.numel(), 1)
                for start in range(0, rows.numel(), size):
                    self._update_rows(p, state, rows[start:start + size], g[start:start + size], group)
        return loss

    @staticmethod
    def _update_rows(p: Tensor, state: dict, rows: Tensor, g: Tensor, group: dict) -> None:
        """One Adam step of the unique `rows` (R,) of `p` with their summed gradient rows g (R, ...)."""
        beta1, beta2 = group["betas"]
        moments = state["moments"].index_select(0, rows)
        m, v = moments[:, 0], moments[:, 1]
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        t = state["step"].index_select(0, rows) + 1
        state["moments"].index_copy_(0, rows, moments)
        state["step"].index_copy_(0, rows, t)
        # torch.optim.Adam's arithmetic with one bias correction per row, in place on the gathered
        # copies (already stored): no further (rows, ...) temporaries.
        view = (-1,) + (1,) * (p.dim() - 1)  # broadcast per-row scalars over the row
        step_size = (group["lr"] / (1 - beta1 ** t.to(p.dtype))).view(view)
        bias2_sqrt = (1 - beta2 ** t.to(p.dtype)).sqrt_().view(view)
        denom = v.sqrt_().div_(bias2_sqrt).add_(group["eps"])
        # Rows are unique: gather, update, scatter back (index_add_ is slower on the CPU).
        weights = p.index_select(0, rows)
        weights.sub_(m.div_(denom).mul_(step_size))
        p.index_copy_(0, rows, weights)

    def state_dict(self) -> dict:
        """As torch's, without the state of file-backed tables (pkmlm.memory.values_file): it stays in its files."""
        state = super().state_dict()
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in enumerate(params):
            if file_of(p) is not None:
                state["state"].pop(i, None)
        return state

    @torch.no_grad()
    def reset_state(self, param: nn.Parameter, rows: Tensor) -> None:
        """Zero the moments and step count of `rows` (LongTensor (R,)) of `param`: fresh Adam rows."""
        if not any(param is p for g in self.param_groups for p in g["params"]):
            raise ValueError("reset_state: param is not optimized by this RowAdam")
        state = self.state.get(param)
        if not state:  # no step taken yet: every row is already fresh
            return
        rows = rows.to(device=param.device, dtype=torch.long)
        for name in ("moments", "step"):
            state[name].index_fill_(0, rows, 0)


class Optimizers:
    """The optimizers a training step uses together: `dense` (AdamW over every non-value parameter)
    and `values` (RowAdam over sparse memory value tables; None when there are none).

    `set_lr_factor(f)` sets every group's lr to its base lr times f (the schedule multiplies both).
    """

    def __init__(self, dense: torch.optim.Optimizer, values: RowAdam | None):
        self.dense, self.values = dense, values
        for group in self._groups():
            group.setdefault("base_lr", group["lr"])

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.dense] + ([self.values] if self.values is not None else [])

    def _groups(self) -> list[dict]:
        return [g for opt in self._optimizers() for g in opt.param_groups]

    def step(self, scaler: torch.amp.GradScaler | None = None) -> None:
        """Step every optimizer (through ``scaler``, which skips the step on inf/nan grads, when given)."""
        for opt in self._optimizers():
            if scaler is not None:
                scaler.step(opt)
            else:
                opt.step()

    def unscale_(self, scaler: torch.amp.GradScaler) -> None:
        """Divide every optimizer's grads by ``scaler``'s scale (before clipping); no-op for a disabled scaler."""
        for opt in self._optimizers():
            scaler.unscale_(opt)

    def zero_grad(self) -> None:
        for opt in self._optimizers():
            opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def reset_rows(self, param: nn.Parameter, rows: Tensor) -> None:
        """Make the optimizer state of some rows of ``param`` start afresh (dead-slot re-initialisation).

        rows: LongTensor (R,) of indices into dim 0, or a bool mask over ``param``'s leading dims. A value
        table's rows (RowAdam) get zero moments and step count; a dense parameter's rows get zero Adam
        moments (AdamW keeps one step count per tensor, so that goes on).
        """
        if self.values is not None and any(param is p for g in self.values.param_groups for p in g["params"]):
            if rows.dtype == torch.bool:
                rows = rows.nonzero().flatten() if rows.dim() == 1 else None
                if rows is None:
                    raise ValueError("reset_rows: a value table's rows are given as indices or a 1-d mask")
            self.values.reset_state(param, rows)
            return
        if not any(param is p for g in self.dense.param_groups for p in g["params"]):
            raise ValueError("reset_rows: param is not optimized by these optimizers")
        state = self.dense.state.get(param)
        if not state:  # no step taken yet: every row is already fresh
            return
        for name in ("exp_avg", "exp_avg_sq"):
            set_where_(state[name], rows, 0.0)  # a DTensor under FSDP

    def set_lr_factor(self, factor: float) -> None:
        for group in self._groups():
            group["lr"] = group["base_lr"] * factor

    def state_dict(self) -> dict:
        return {"dense": self.dense.state_dict(),
                "values": self.values.state_dict() if self.values is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"dense", "values"} or (state["values"] is None) != (self.values is None):
            raise ValueError("optimizer state does not match this model: it was saved for a model "
                             "with a different set of memory value tables")
        # The base lrs come from the config that built these optimizers, not from the file: resuming a diverged
        # run with a lower train.lr / train.value_lr must take effect (pkmlm.checkpoint.STEERING_CHANGES).
        base_lrs = [g["base_lr"] for g in self._groups()]
        self.dense.load_state_dict(state["dense"])
        if self.values is not None:
            self.values.load_state_dict(state["values"])
        for group, lr in zip(self._groups(), base_lrs):
            group["base_lr"] = lr


def make_optimizers(model: nn.Module, *, lr: float, value_lr: float,
                    betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-8,
                    weight_decay: float = 0.0) -> Optimizers:
    """Route `model`'s parameters: memory value tables to RowAdam at `value_lr`, the rest to AdamW at `lr`.

    Value tables are found through `ProductKeyMemory.value_parameters()`; a table shared by several
    memories is optimized once. A table built with `sparse=False` has dense gradients, so it goes to
    the dense AdamW instead, in its own group at `value_lr` without weight decay.
    `weight_decay` (decoupled, AdamW) applies to matrices only (dim >= 2): not to biases, norms or values.
    """
    _check_adam_args(lr, betas, eps)
    _check_adam_args(value_lr, betas, eps, lr_name="value_lr")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    sparse_values, dense_values, value_ids = {}, {}, set()
    for module in model.modules():
        if isinstance(module, ProductKeyMemory):
            target = sparse_values if module.values.sparse else dense_values
            for p in module.value_parameters():
                if p.requires_grad:  # a frozen table (pkmlm/training/finetune.py) gets no optimizer
                    target[id(p)] = p
                value_ids.add(id(p))
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in value_ids]
    if not rest and not dense_values:
        # Only value tables train (train.trainable=slots): the AdamW holds the frozen rest, which never gets a
        # gradient, so it never takes a step or state; the loop keeps one shape.
        rest = [p for p in model.parameters() if id(p) not in value_ids]
    groups = [
        dict(params=[p for p in rest if p.dim() >= 2], weight_decay=weight_decay),
        dict(params=[p for p in rest if p.dim() < 2], weight_decay=0.0),
        dict(params=list(dense_values.values()), weight_decay=0.0, lr=value_lr),
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("make_optimizers: the model has no trainable dense parameters")
    dense = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    values = RowAdam(list(sparse_values.values()), lr=value_lr, betas=betas, eps=eps) if sparse_values else None
    return Optimizers(dense, values)


def inverse_sqrt_warmup(step: int, warmup_steps: int) -> float:
    """lr factor for update number `step` (1-based): step / warmup_steps up to warmup_steps, then
    sqrt(warmup_steps / step). warmup_steps=0 means no warmup and no decay (factor 1)."""
    if step < 1:
        raise ValueError(f"step is the 1-based index of the update, got {step}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if warmup_steps == 0:
        return 1.0
    return min(step / warmup_steps, math.sqrt(warmup_steps / step))


def _check_adam_args(lr, betas, eps, lr_name="lr") -> None:
    if not lr > 0:
        raise ValueError(f"{lr_name} must be > 0, got {lr}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
