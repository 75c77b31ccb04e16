"""`tune=e2e`: end-to-end distillation of the continuous parameters of a compressed model
(EfficientQAT's E2E-QP, arXiv 2407.11062; PV-Tuning's continuous phase, arXiv 2405.14852).

After the block walk every discrete choice is frozen: codes, masks, zero points, widths, group
sizes, ranks. What is left continuous is trained on the whole model's output:

    quantisation scales   per (row, group) of each packed base part; the codes' integer offsets
                          (code − zero) stay as stored, so W = (code − zero) · s ⊙ M
    low-rank factors      U, V; 16-bit factors as they are, k-bit factors fake-quantised on a
                          per-row grid refitted every step (straight-through), and re-quantised
                          to their stored width when written back
    norm gains            every RMSNorm (LayerNorm) weight; kept at the model's dtype

The loss is the KL divergence KL(teacher ‖ student) of the next-token distribution at every
position of the calibration windows. The teacher is the dense model, run ONCE before the walk
compresses it (the dense and compressed models are never resident together): per position it
keeps the top-k log-probabilities and their token ids, plus the log of the mass outside them as
one bucket. Both distributions are coarsened to those k + 1 outcomes (the student's bucket is the
log-sum-exp of its logits outside the teacher's top-k), so the loss is an exact KL between two
proper distributions, a lower bound of the full-vocabulary KL that tends to it as k grows (not a
top-k renormalisation, which would ignore how much mass the student puts elsewhere).

The KL is computed in float32, a chunk of positions at a time (a 128k vocabulary never has a
batch × seq × vocab float32 tensor): the final hidden states are detached, each chunk's loss is
back-propagated into them through the LM head, and then once through the body. Decoder blocks
are re-run in the backward pass (activation checkpointing), so memory is the compressed model,
one block's activations, the blocks' inputs and the float32 trained tensors with their Adam
moments.

Adam's step of each trained tensor is `lr` × its RMS (scale-free across layers, as in
`tune=block`), on a cosine schedule. At the end the trained values are written into the packed
buffers (scales through `.half()`), so bits/param is unchanged, and kept only if they lower the
KL on the windows trained on: tuning never increases the loss it minimises.

A model that is not resident (compress.stream, compress.offload) is distilled block by block,
with the same loss, tensors and steps: e2e_walk.py.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from ciuic_lab.compress.quant import grid
from ciuic_lab.compress.state import rtn_quantize
from ciuic_lab.compress.store import packing
from ciuic_lab.compress.store.linear import CompressedLinear
from ciuic_lab.compress.tune.block import BlockTune
from ciuic_lab.compress.tune.rounding import fake_quant
from ciuic_lab.errors import ConfigError, check_positive_ints
from ciuic_lab.errors import check as _check
from ciuic_lab.models.adapters import adapter_for, swapped

# float32 logits per chunk: 2^26 values (256 MB: 512 positions of a 128k vocabulary), with a few
# same-sized temporaries (log-sum-exp, the bucket's masked copy, the gradient).
_CHUNK_VALUES = 1 << 26


@dataclass
class Teacher:
    """The dense model's next-token distributions on `windows` (n, T), coarsened to its top-k
    tokens plus one bucket: `logp` (n, T, k) float32 log-probabilities of the tokens `index`
    (n, T, k) int32, `rest` (n, T) float32 the log of the mass outside them."""

    windows: torch.Tensor
    logp: torch.Tensor
    index: torch.Tensor
    rest: torch.Tensor

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        save_file({f.name: getattr(self, f.name).contiguous() for f in fields(self)}, str(path))

    @classmethod
    def load(cls, path: str | Path) -> Teacher:
        from safetensors.torch import load_file

        return cls(**load_file(str(path)))

    def nbytes(self) -> int:
        return sum(getattr(self, f.name).nbytes for f in fields(self))


@dataclass
class E2ETune:
    """Config of `tune=e2e` (see the module docstring); validated on construction."""

    stage: ClassVar[str] = "tune"
    iters: int = 200  # optimisation steps
    lr: float = 1e-3  # Adam step of each trained tensor, relative to its RMS
    batch_size: int = 4  # calibration windows per step
    samples: int | None = None  # calibration windows distilled on (null: all of them)
    topk: int = 64  # teacher tokens kept per position (+ one bucket for the rest)
    seed: int = 0

    def __post_init__(self):
        check_positive_ints(self, ("iters", "batch_size", "topk"), "tune")
        _check(isinstance(self.lr, (int, float)) and not isinstance(self.lr, bool)
               and 0 < self.lr < 1, "tune.lr", f"must be in (0, 1), got {self.lr!r}")
        _check(self.samples is None or (isinstance(self.samples, int)
                                        and not isinstance(self.samples, bool)
                                        and self.samples > 0),
               "tune.samples", f"must be a positive integer or null, got {self.samples!r}")
        _check(isinstance(self.seed, int) and not isinstance(self.seed, bool),
               "tune.seed", f"must be an integer, got {self.seed!r}")

    # ---- the teacher, from the dense model ------------------------------------------------
    @torch.no_grad()
    def teacher(self, model: nn.Module, windows: torch.Tensor) -> Teacher:
        """Run the dense `model` once over the first `samples` windows; the result lives on the
        host (k · 8 + 4 bytes per position)."""
        windows = windows[: self.samples] if self.samples is not None else windows
        body, head = _body_head(model)
        k = min(self.topk, head.out_features - 1)  # at least one token in the bucket
        dev = _device(model)
        parts = [_coarsen(_hidden(body, windows[i:i + self.batch_size].to(dev)), head, k)
                 for i in range(0, windows.shape[0], self.batch_size)]
        return Teacher(windows.cpu(), *(torch.cat(p) for p in zip(*parts)))

    # ---- the distillation -----------------------------------------------------------------
    def run(self, model: nn.Module, teacher: Teacher, progress: bool = False) -> dict:
        """Distil the resident compressed `model` against `teacher`; returns {kl_before,
        kl_after, kept, steps, seconds} (KL in nats per position, on the teacher's windows)."""
        t0 = time.perf_counter()
        packed = [(n, m) for n, m in model.named_modules() if isinstance(m, CompressedLinear)]
        for name, mod in packed:
            if mod.kernel is not None:
                raise ValueError(f"{name}: a layer prepared for a kernel has no packed base to "
                                 "tune; run tune=e2e before prepare()")
        norms = _norms(model)
        before = self.kl(model, teacher)
        saved = _snapshot(packed, norms)
        was = {p: p.requires_grad for p in model.parameters()}
        trainables = {n: _Trainable(m) for n, m in packed}
        try:
            for p in model.parameters():
                p.requires_grad_(False)
            with swapped(model, trainables):
                self._fit(model, teacher, list(trainables.values()), norms, progress)
                with torch.no_grad():
                    for t in trainables.values():
                        t.write_back()
        except BaseException:  # an interrupted fit leaves half-trained norms and buffers
            _restore(saved)
            raise
        finally:
            for p, flag in was.items():
                p.requires_grad_(flag)
                p.grad = None
        after = self.kl(model, teacher)
        kept = after < before
        if not kept:  # the walk's own result was better on the windows distilled on
            _restore(saved)
        return {"kl_before": before, "kl_after": after if kept else before, "kept": kept,
                "steps": self.iters, "seconds": time.perf_counter() - t0}

    @torch.no_grad()
    def kl(self, model: nn.Module, teacher: Teacher) -> float:
        """Mean KL(teacher ‖ model) per position over the teacher's windows (float32 maths)."""
        body, head = _body_head(model)
        total, n = 0.0, 0
        for i in range(0, teacher.windows.shape[0], self.batch_size):
            sl = slice(i, i + self.batch_size)
            h = _hidden(body, teacher.windows[sl].to(_device(model)))
            total += float(_kl_sum(h, head, teacher, sl, backward=False))
            n += h.shape[0] * h.shape[1]
        return total / n

    def _fit(self, model, teacher: Teacher, trainables: list[_Trainable],
             norms: list[nn.Parameter], progress: bool) -> None:
        masters = [nn.Parameter(p.detach().float().clone()) for p in norms]
        for p in norms:
            p.requires_grad_(True)
        tensors = [p for t in trainables for p in t.parameters()] + masters
        adam = torch.optim.Adam([{"params": [p], "lr": self.lr * _rms(p)} for p in tensors])
        base = [g["lr"] for g in adam.param_groups]
        body, head = _body_head(model)
        dev = _device(model)
        gen = torch.Generator().manual_seed(self.seed)
        n = teacher.windows.shape[0]
        with _checkpointed(_blocks(model)):
            for it in tqdm(range(self.iters), desc="tune e2e", disable=not progress,
                           leave=False):
                for g, lr in zip(adam.param_groups, base):
                    g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * it / self.iters))
                adam.zero_grad(set_to_none=True)
                for p in norms:
                    p.grad = None
                pick = torch.randperm(n, generator=gen)[: self.batch_size]
                with torch.enable_grad():
                    h = _hidden(body, teacher.windows[pick].to(dev))
                    _kl_sum(h, head, teacher, pick, backward=True)
                # norm gains train as float32 masters, stepped and rounded back to the model's
                # dtype: a bf16 gain would swallow updates below its 8-bit mantissa
                for p, m in zip(norms, masters):
                    m.grad = None if p.grad is None else p.grad.float()
                adam.step()
                with torch.no_grad():
                    for p, m in zip(norms, masters):
                        p.copy_(m.to(p.dtype))


@dataclass
class FullTune:
    """Config of `tune=full`: `tune=block` inside the walk, then `tune=e2e` on the whole
    compressed model. `block` and `e2e` take the knobs of BlockTune and E2ETune."""

    stage: ClassVar[str] = "tune"
    block: BlockTune | dict = field(default_factory=BlockTune)
    e2e: E2ETune | dict = field(default_factory=E2ETune)

    def __post_init__(self):
        self.block = _nested(BlockTune, self.block, "block")
        self.e2e = _nested(E2ETune, self.e2e, "e2e")


def split_tune(tune) -> tuple[BlockTune | None, E2ETune | None]:
    """(the part the block walk runs, the part run on the compressed model) of a tune config."""
    if isinstance(tune, FullTune):
        return tune.block, tune.e2e
    if isinstance(tune, E2ETune):
        return None, tune
    return tune, None


def _nested(cls, value, name: str):
    if isinstance(value, cls):
        return value
    key = f"tune.{name}"
    _check(isinstance(value, dict), key, f"must be a mapping of {cls.__name__} knobs, "
                                         f"got {value!r}")
    known = {f.name for f in fields(cls)}
    for k in value:
        _check(k in known, f"{key}.{k}", f"unknown key; known here: {', '.join(sorted(known))}")
    try:
        return cls(**value)
    except ConfigError as e:  # each part names `tune.<knob>`: say which part of tune=full
        raise ConfigError(str(e).replace("tune.", f"{key}.", 1)) from None


# ---- the trained form of a packed layer ----------------------------------------------------
class _Trainable(nn.Module):
    """Stands in for one CompressedLinear while it is distilled: the same weight, with its
    scales and factors as float32 parameters and everything discrete read from the packed
    buffers."""

    def __init__(self, packed: CompressedLinear):
        super().__init__()
        self.packed = packed
        base, lr = packed.meta["base"], packed.meta["lowrank"]
        self.quant = None if base is None else base["quant"]
        self.factor_quant = None if lr is None else lr["quant"]
        if self.quant is not None:
            self.scale = nn.Parameter(packed.scale.float().clone())
            # The codes are frozen: unpack them once (int16: 2 bytes per weight, one layer's
            # worth per layer while distilling) instead of on every forward.
            with torch.no_grad():
                dense = packed.dense_codes()  # pruned entries at their zero code: offset 0
                zero = grid.expand_groups(dense.zero, packed.in_features, self.quant["group_size"])
                offsets = (dense.codes.float() - zero).to(torch.int16)
            self.register_buffer("offsets", offsets, persistent=False)
        if lr is not None:
            u, v = packed.lowrank_factors()
            self.u, self.v = nn.Parameter(u.clone()), nn.Parameter(v.clone())

    def weight(self) -> torch.Tensor:
        p = self.packed
        w = None
        if self.quant is not None:  # frozen codes and zero points, trained scales
            w = self.offsets.float() * grid.expand_groups(self.scale, p.in_features,
                                                          self.quant["group_size"])
        elif p.meta["base"] is not None:
            w = p.base_weight()  # 16-bit kept values: not trained
        if p.meta["lowrank"] is not None:
            q = self.factor_quant
            uv = self.u @ self.v if not q else (
                fake_quant(self.u, q["bits"], q["group_size"], q["sym"])
                @ fake_quant(self.v, q["bits"], q["group_size"], q["sym"]))
            w = uv if w is None else w + uv
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.packed
        b = p.bias.to(x.dtype) if p.meta["bias"] else None
        return F.linear(x, self.weight().to(x.dtype), b)

    @torch.no_grad()
    def write_back(self) -> None:
        """The trained values into the packed buffers, in their stored formats and shapes."""
        p = self.packed
        if self.quant is not None:
            p.scale.copy_(self.scale.half())
        if p.meta["lowrank"] is None:
            return
        q = self.factor_quant
        for name, t in (("u", self.u), ("v", self.v)):
            if q is None:
                getattr(p, name).copy_(t.to(getattr(p, name).dtype))
                continue
            part = rtn_quantize(t.detach().float(), q["bits"], q["group_size"], q["sym"])
            getattr(p, f"{name}_codes").copy_(packing.pack_bits(part.codes.reshape(-1),
                                                                q["bits"]))
            getattr(p, f"{name}_scale").copy_(part.scale.half())
            if not q["sym"]:
                getattr(p, f"{name}_zero").copy_(part.zero.to(torch.uint8))


# ---- the model's pieces --------------------------------------------------------------------
def _body_head(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """The decoder up to its final norm, and the LM head (run apart so the head's float32
    logits can be taken a chunk of positions at a time)."""
    return model.get_decoder(), model.get_output_embeddings()


def _blocks(model: nn.Module) -> nn.ModuleList:
    return adapter_for(model).blocks(model)


def _hidden(body: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return body(input_ids=ids, use_cache=False).last_hidden_state


def _norms(model: nn.Module) -> list[nn.Parameter]:
    """Every normalisation gain (RMSNorm / LayerNorm weights), the final norm included."""
    return [m.weight for _, m in _norm_modules(model)]


def _norm_modules(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every normalisation layer with a gain vector in `module`."""
    return [(n, m) for n, m in module.named_modules()
            if "Norm" in type(m).__name__ and isinstance(getattr(m, "weight", None), nn.Parameter)
            and m.weight.dim() == 1]


@torch.no_grad()
def _coarsen(h: torch.Tensor, head: nn.Linear, k: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The next-token distributions of final hidden states `h` (B, T, H) as the teacher keeps
    them: (top-k log-probabilities (B, T, k), their token ids int32, log of the rest (B, T)), on
    the host, the head's float32 logits taken a chunk of positions at a time."""
    flat = h.reshape(-1, h.shape[-1])
    lp, ix, rest = [], [], []
    for s, e in _chunks(flat.shape[0], head.out_features):
        logits = head(flat[s:e]).float()
        logz = logits.logsumexp(-1, keepdim=True)
        top, idx = logits.topk(k, dim=-1)
        lp.append((top - logz).cpu())
        ix.append(idx.to(torch.int32).cpu())
        rest.append((logits.scatter(-1, idx, float("-inf")).logsumexp(-1)
                     - logz.squeeze(-1)).cpu())
    shape = h.shape[:2]
    return (torch.cat(lp).view(*shape, k), torch.cat(ix).view(*shape, k),
            torch.cat(rest).view(*shape))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _rms(p: torch.Tensor) -> float:
    return float(p.detach().float().pow(2).mean().sqrt().clamp(min=1e-8))


def _chunks(rows: int, vocab: int):
    step = max(1, _CHUNK_VALUES // vocab)
    return [(s, min(s + step, rows)) for s in range(0, rows, step)]


@contextmanager
def _checkpointed(blocks: nn.ModuleList):
    """Each decoder block re-run in the backward pass instead of keeping its activations."""
    for b in blocks:
        b.forward = partial(checkpoint, b.forward, use_reentrant=False)
    try:
        yield
    finally:
        for b in blocks:
            del b.forward  # the instance attribute: the class' forward again


def _kl_sum(h: torch.Tensor, head: nn.Linear, teacher: Teacher, rows,
            backward: bool) -> torch.Tensor:
    """Sum over the positions of `h` (B, T, H) of KL(teacher ‖ student) on the k + 1 outcomes;
    with `backward`, back-propagate its mean over the positions into `h`'s graph."""
    lp_t = teacher.logp[rows].to(h.device)
    ix = teacher.index[rows].to(h.device, torch.int64)
    rest_t = teacher.rest[rows].to(h.device)
    k = lp_t.shape[-1]
    lp_t, ix, rest_t = lp_t.reshape(-1, k), ix.reshape(-1, k), rest_t.reshape(-1)
    leaf = h.detach().requires_grad_(backward)
    flat = leaf.reshape(-1, h.shape[-1])
    n = flat.shape[0]
    total = torch.zeros((), device=h.device)
    for s, e in _chunks(n, head.out_features):
        with torch.set_grad_enabled(backward):
            logits = head(flat[s:e]).float()
            logz = logits.logsumexp(-1, keepdim=True)
            lp_s = logits.gather(-1, ix[s:e]) - logz
            rest_s = logits.scatter(-1, ix[s:e], float("-inf")).logsumexp(-1) - logz.squeeze(-1)
            kl = ((lp_t[s:e].exp() * (lp_t[s:e] - lp_s)).sum(-1)
                  + rest_t[s:e].exp() * (rest_t[s:e] - rest_s)).sum()
        if backward:
            (kl / n).backward()
        total += kl.detach()
    if backward:
        h.backward(leaf.grad)
    return total


def _snapshot(packed, norms) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(buffer, copy) of everything distillation may change, to undo it."""
    keep = ("scale", "u", "v", "u_codes", "u_scale", "u_zero", "v_codes", "v_scale", "v_zero")
    out = [(b, b.clone()) for _, m in packed for name, b in m.named_buffers(recurse=False)
           if name in keep]
    return out + [(p.data, p.detach().clone()) for p in norms]


@torch.no_grad()
def _restore(saved) -> None:
    for t, copy in saved:
        t.copy_(copy)
