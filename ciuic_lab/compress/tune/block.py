"""`tune=block`: learned rounding, clipping and factors, block by block (SignRound, arXiv
2309.05516; OmniQuant's learnable clipping, arXiv 2308.13137), inside the block walk.

After a block's stages have chosen every layer's mask, width, group size and rank and packed it,
the block is tuned so that the compressed block reproduces the dense one:

    student input   the compressed path's hidden states entering the block (what the compressed
                    model will really feed it: earlier blocks' errors included)
    target          the dense block's output on the dense path's hidden states (the original
                    model's activations), so each block may also undo some of its predecessors'
                    error, as AutoRound does with its quantised inputs
    loss            mean squared error over the calibration windows, `batch_size` windows a step
    updates         V and α: signed gradient descent, step lr·(1 − t/iters) (SignRound);
                    16-bit kept values and low-rank factors: Adam, step factor_lr × the tensor's
                    RMS (scale-free), same linear decay
    result          `keep=best`: the parameters of the step with the lowest mini-batch loss (as
                    AutoRound keeps); `keep=last`: the last step's

Routed experts are tuned one at a time on the tokens their router sends them (the compressed
path's), against the dense expert's output on those tokens; the block-level tuning then sees
them frozen. At the end the tuned parts are packed in the stages' formats, and the block keeps
them only if they lower the block's loss on all tuned windows (measured with the packed layers,
fp16 scales included): tuning never increases the error it minimises.

Memory on top of the walk's: the dense path's activations and the targets (each as large as the
calibration activations, stored by the same `Activations` rule), and per tuned layer four float32
(out, in) tensors (`rounding.TunableLinear`), one block (or one routed expert) at a time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ciuic_lab.compress.state import LayerState
from ciuic_lab.compress.store.linear import CompressedLinear
from ciuic_lab.compress.tune.rounding import TunableLinear
from ciuic_lab.errors import check as _check
from ciuic_lab.errors import check_positive_ints
from ciuic_lab.models.adapters import set_submodule, swapped


@dataclass
class BlockTune:
    """Config of `tune=block` (see the module docstring); validated on construction."""

    stage: ClassVar[str] = "tune"
    iters: int = 200  # optimisation steps per block (and per routed expert)
    lr: float | None = None  # signed step of V and α; null: 1/iters (SignRound's default)
    factor_lr: float = 1e-3  # Adam step of 16-bit values and factors, relative to their RMS
    batch_size: int = 8  # calibration windows per step
    samples: int | None = None  # calibration windows tuned on (null: all of them)
    expert_tokens: int = 1024  # routed-expert tokens per step
    start: str = "rtn"  # "rtn": round-to-nearest (SignRound; measured better); "stage": its codes
    keep: str = "best"  # "best": the step with the lowest loss seen (as AutoRound); "last"
    seed: int = 0

    def __post_init__(self):
        check_positive_ints(self, ("iters", "batch_size", "expert_tokens"), "tune")
        _check(self.lr is None or (isinstance(self.lr, (int, float)) and 0 < self.lr < 1),
               "tune.lr", f"must be in (0, 1) or null, got {self.lr!r}")
        _check(isinstance(self.factor_lr, (int, float)) and 0 <= self.factor_lr < 1,
               "tune.factor_lr", f"must be in [0, 1), got {self.factor_lr!r}")
        _check(self.samples is None or (isinstance(self.samples, int) and self.samples > 0),
               "tune.samples", f"must be a positive integer or null, got {self.samples!r}")
        _check(self.start in ("stage", "rtn"), "tune.start",
               f"must be 'stage' or 'rtn', got {self.start!r}")
        _check(self.keep in ("best", "last"), "tune.keep",
               f"must be 'best' or 'last', got {self.keep!r}")

    # ---- the optimisation, for any set of tunable layers -----------------------------------
    def fit(self, layers: list[TunableLinear], loss_of: Callable[[int], torch.Tensor],
            units: int, per_step: int) -> None:
        """`iters` steps on the mean of `loss_of(k)` over `per_step` units drawn from
        range(units) (a unit: one stored batch of windows, or one chunk of expert tokens)."""
        signed = [p for t in layers for p in (*t.rounding, *t.clip)]
        adam_groups = [{"params": [p], "lr": self.factor_lr * float(p.detach().pow(2).mean()
                                                                    .sqrt().clamp(min=1e-8))}
                       for t in layers for p in t.continuous]
        adam = torch.optim.Adam(adam_groups) if adam_groups and self.factor_lr > 0 else None
        base_lrs = [g["lr"] for g in adam.param_groups] if adam else []
        lr = self.lr if self.lr is not None else 1.0 / self.iters
        gen = torch.Generator().manual_seed(self.seed)
        per_step = min(per_step, units)
        params = [p for t in layers for p in t.parameters()]
        best_loss, best = math.inf, None
        for it in range(self.iters):
            decay = 1.0 - it / self.iters
            for t in layers:
                t.zero_grad(set_to_none=True)
            pick = torch.randperm(units, generator=gen)[:per_step].tolist()
            step_loss = 0.0
            with torch.enable_grad():
                for k in pick:
                    loss = loss_of(k) / len(pick)
                    loss.backward()
                    step_loss += float(loss.detach())
            if self.keep == "best" and step_loss < best_loss:
                # the parameters this loss was measured at, before the step moves them; one
                # more copy of what is tuned (V, α, factors) for the block or expert at hand
                best_loss = step_loss
                best = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p in signed:
                    if p.grad is not None:
                        p.sub_(lr * decay * p.grad.sign())
            if adam is not None:
                for g, base in zip(adam.param_groups, base_lrs):
                    g["lr"] = base * decay
                adam.step()
            for t in layers:
                t.clamp_()
        if best is not None:
            with torch.no_grad():
                for p, b in zip(params, best):
                    p.copy_(b)

    # ---- a block ---------------------------------------------------------------------------
    def tune_block(self, block: nn.Module, packed: dict[str, tuple[object, nn.Module]],
                   states: dict[str, LayerState], inputs, targets,
                   store_dtype: torch.dtype) -> dict:
        """Tune the block's non-expert packed layers (`packed`: name in the block -> (Layer,
        packed module), their LayerStates in `states`) so that block(inputs) ≈ targets; swap
        the tuned packed layers in when they lower the loss. Returns {loss_before, loss_after,
        kept, seconds}."""
        t0 = time.perf_counter()
        names = [n for n in packed if n in states and _tunable(states[n])]
        units = len(inputs) if self.samples is None else min(len(inputs),
                                                             _units(inputs, self.samples))
        if not names:
            return {"seconds": 0.0}

        def loss_of(k: int) -> torch.Tensor:
            x, kw = inputs.hidden[k], inputs.kwargs[k]
            out = block(x, **kw)
            y = out[0] if isinstance(out, tuple) else out
            return F.mse_loss(y.float(), targets[k].float())

        before = _mean_loss(loss_of, units)
        tunables = {n: TunableLinear(states[n], self.start) for n in names}
        with swapped(block, tunables):
            self.fit(list(tunables.values()), loss_of, units,
                     max(1, math.ceil(self.batch_size / _windows_per_unit(inputs))))
            new = {n: CompressedLinear.pack(t.tuned_state(), store_dtype).to(_device(packed[n][1]))
                   for n, t in tunables.items()}
        for n, mod in new.items():
            set_submodule(block, n, mod)
        after = _mean_loss(loss_of, units)
        kept = after < before
        if kept:
            for n, mod in new.items():
                packed[n] = (packed[n][0], mod)
        else:  # the stages' own result was better on the windows tuned on: keep it
            for n in names:
                set_submodule(block, n, packed[n][1])
        return {"loss_before": before, "loss_after": after if kept else before, "kept": kept,
                "seconds": time.perf_counter() - t0}

    # ---- a routed expert -------------------------------------------------------------------
    def tune_expert(self, gate_up: LayerState, down: LayerState, x: torch.Tensor,
                    target: torch.Tensor, mlp: Callable, store_dtype: torch.dtype,
                    packed: tuple[nn.Module, nn.Module]) -> tuple[nn.Module, nn.Module, dict]:
        """One routed expert on its tokens x (t, H) against the dense expert's output `target`;
        `mlp(x, gate_up_weight, down_weight)` is the adapter's expert (its layout, its
        activation). Returns the packed (gate_up, down) to keep and the losses."""
        if not (_tunable(gate_up) or _tunable(down)):
            return packed[0], packed[1], {"seconds": 0.0}
        t0 = time.perf_counter()
        n = self.expert_tokens
        starts = list(range(0, x.shape[0], n))

        def loss(gu_w: torch.Tensor, dn_w: torch.Tensor, k: int) -> torch.Tensor:
            s = starts[k]
            return F.mse_loss(mlp(x[s:s + n], gu_w, dn_w).float(), target[s:s + n].float())

        def packed_loss(mods) -> float:  # dequantised once, not per chunk
            gu_w, dn_w = (m.dequantized_weight(x.dtype) for m in mods)
            return _mean_loss(lambda k: loss(gu_w, dn_w, k), len(starts))

        before = packed_loss(packed)
        tg, td = TunableLinear(gate_up, self.start), TunableLinear(down, self.start)
        self.fit([tg, td], lambda k: loss(tg.weight(), td.weight(), k), len(starts), 1)
        device = _device(packed[0])
        new = tuple(CompressedLinear.pack(t.tuned_state(), store_dtype).to(device)
                    for t in (tg, td))
        after = packed_loss(new)
        kept = after < before
        out = new if kept else packed
        return out[0], out[1], {"loss_before": before, "loss_after": after if kept else before,
                                "kept": kept, "seconds": time.perf_counter() - t0}


def _tunable(state: LayerState) -> bool:
    return state.base is not None or state.u is not None


def _windows_per_unit(inputs) -> int:
    return max(1, int(inputs.hidden[0].shape[0]))


def _units(inputs, windows: int) -> int:
    return max(1, math.ceil(windows / _windows_per_unit(inputs)))


def _device(mod: nn.Module) -> torch.device:
    return next(mod.buffers()).device


@torch.no_grad()
def _mean_loss(loss_of: Callable[[int], torch.Tensor], units: int) -> float:
    return sum(float(loss_of(k)) for k in range(units)) / units
