"""`tune=e2e` for a model that is not resident: the distillation of e2e.py (EfficientQAT's E2E-QP,
arXiv 2407.11062), its forward and backward walked one decoder block at a time.

The same loss, the same trained tensors (base scales, low-rank factors, norm gains), the same
steps and windows as `E2ETune.run`; only where the model is differs. A provider (blocks.py) hands
out one block at a time: `Resident` (compress.offload: the model waits on the host, a block visits
the device), `checkpoint.Stored` (compress.stream: the compressed model is a checkpoint on disk).
One step, for a batch of B windows of T tokens:

    capture              hidden states entering block 0 (embeddings run on the device)
    forward  i = 0..L-1  load block i with its trained values installed, keep its input, run it
    loss                 final norm and head: KL(teacher ‖ student), a chunk of positions at a
                         time, back-propagated to the last block's output
    backward i = L-1..0  load block i again, re-run it from its kept input under autograd, carry
                         the gradient to its input, step Adam on block i's tensors; release

Routed experts stay packed inside their block (CompressedExperts): the input gradient goes
through them, nothing of theirs but scales and factors is trained, as in the resident form.

Memory, at any time: one block on the device (and its autograd graph for one batch), the block
inputs of one batch for the whole depth (L · B · T · H: on the device if they fit, else on disk,
never on the host, as in the Fisher walk), the teacher's cache (k · 8 + 4 bytes per calibration
position), and the trained state: every packed layer's scales and factors and every norm gain in
float32 with their two Adam moments (12 bytes per scale: about 9 % of a 3-bit g128 model's packed
bytes, with factors and norms more), held on the host and moved to the device with their block.
Each visit of a block unpacks its codes again (the resident form unpacks them once and keeps
them: 2 bytes per weight for the whole model, which is what a non-resident model cannot afford).
A step reads every block twice, so the cost is two forwards and a backward of streamed blocks.

The trained values are written back (scales as fp16, factors re-quantised) only if the KL of
what would be stored beats the walk's: `provider.rewrite` edits the model in place (Resident) or
writes a new checkpoint beside the old one and swaps it in (Stored), so bits/param is unchanged.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from ciuic_lab.compress.store.linear import CompressedLinear
from ciuic_lab.compress.tune.e2e import (
    E2ETune,
    Teacher,
    _coarsen,
    _kl_sum,
    _norm_modules,
    _restore,
    _rms,
    _snapshot,
    _Trainable,
)
from ciuic_lab.compress.walk.blocks import Activations, capture, dense_forward, run_block
from ciuic_lab.models.adapters import swapped


@torch.no_grad()
def teacher(e2e: E2ETune, provider, windows: torch.Tensor, expert_chunk: int = 8,
            progress: bool = False) -> Teacher:
    """The dense model's coarsened next-token distributions (as `E2ETune.teacher`), its blocks
    walked one at a time: routed experts a chunk at a time (`dense_forward`), so a streamed
    DeepSeek-V3 never holds a MoE layer whole. Memory: the activations of all teacher windows
    (samples · T · H, as the calibration walk) and the cache it returns."""
    windows = windows[: e2e.samples] if e2e.samples is not None else windows
    inputs = capture(provider, windows, e2e.batch_size)
    hidden = inputs.hidden
    for i in tqdm(range(len(provider)), desc="tune e2e (teacher)", unit="block",
                  disable=not progress, leave=False):
        block = provider.load(i)
        outs = dense_forward(block, i, provider, inputs.at(i, hidden), expert_chunk)
        hidden = Activations(provider.device).fill(outs)
        provider.release(i, block)
    *norms, head = provider.post()
    k = min(e2e.topk, head.out_features - 1)
    parts = [_coarsen(_through(norms, hidden[b]), head, k) for b in range(len(hidden))]
    return Teacher(windows.cpu(), *(torch.cat(p) for p in zip(*parts)))


def run(e2e: E2ETune, provider, teacher: Teacher, progress: bool = False,
        activations: str = "auto") -> dict:
    """Distil the compressed model held by `provider` against `teacher`; returns what
    `E2ETune.run` returns ({kl_before, kl_after, kept, steps, seconds})."""
    t0 = time.perf_counter()
    before = kl(e2e, provider, teacher)
    state = _State(e2e.lr)
    _fit(e2e, provider, teacher, state, progress, activations)
    after = kl(e2e, provider, teacher, state)  # of the values as they would be stored
    kept = after < before
    if kept:
        def write_post(post) -> None:
            if state.post:  # the final norm's gain, when it was trained
                _write(_ends(post), state.post)

        provider.rewrite(lambda i, block: _write(block, state.blocks[i]), write_post)
    return {"kl_before": before, "kl_after": after if kept else before, "kept": kept,
            "steps": e2e.iters, "seconds": time.perf_counter() - t0}


@torch.no_grad()
def kl(e2e: E2ETune, provider, teacher: Teacher, state: _State | None = None) -> float:
    """Mean KL(teacher ‖ model) per position over the teacher's windows (as `E2ETune.kl`); with
    `state`, of the model with the trained values written into its packed formats (each block
    put back as it was after its visit)."""
    inputs = capture(provider, teacher.windows, e2e.batch_size)
    hidden = inputs.hidden
    for i in range(len(provider)):
        block = provider.load(i)
        with _written(block, None if state is None else state.blocks[i]):
            outs = run_block(block, inputs.at(i, hidden))
        hidden = Activations(provider.device).fill(outs)
        provider.release(i, block)
    *norms, head = provider.post()
    total, n = 0.0, 0
    with _written(_ends(norms), None if state is None else state.post):
        for b in range(len(hidden)):
            h = _through(norms, hidden[b])
            rows = slice(b * e2e.batch_size, b * e2e.batch_size + h.shape[0])
            total += float(_kl_sum(h, head, teacher, rows, backward=False))
            n += h.shape[0] * h.shape[1]
    return total / n


# ---- the trained state ---------------------------------------------------------------------
class _Trained:
    """One block's (or the final norms') trained tensors, float32, with their own Adam: the
    same per-tensor optimiser as the resident form, stepped once the block's backward is done."""

    def __init__(self, packed: dict[str, dict[str, nn.Parameter]], norms: dict[str, nn.Parameter],
                 lr: float):
        self.packed, self.norms = packed, norms  # {layer: {scale|u|v: P}}, {norm module: master}
        tensors = self.tensors()
        self.adam = torch.optim.Adam([{"params": [p], "lr": lr * _rms(p)} for p in tensors]) \
            if tensors else None
        self.base = [] if self.adam is None else [g["lr"] for g in self.adam.param_groups]

    def tensors(self) -> list[nn.Parameter]:
        return [p for ps in self.packed.values() for p in ps.values()] + list(self.norms.values())

    def to(self, device: torch.device) -> None:
        """Tensors and Adam moments to `device` (with their block; the host between visits)."""
        for p in self.tensors():
            p.data = p.data.to(device)
            if p.grad is not None:
                p.grad = p.grad.to(device)
        if self.adam is not None:
            for st in self.adam.state.values():
                for k, v in st.items():
                    if k != "step" and torch.is_tensor(v):  # Adam keeps its step count on the host
                        st[k] = v.to(device)

    def step(self, factor: float) -> None:
        if self.adam is None:
            return
        for g, lr in zip(self.adam.param_groups, self.base):
            g["lr"] = lr * factor
        self.adam.step()
        self.adam.zero_grad(set_to_none=True)


class _State:
    """Every block's `_Trained`, made at the block's first visit from what it stores."""

    def __init__(self, lr: float):
        self.lr = lr
        self.blocks: dict[int, _Trained] = {}
        self.post: _Trained | None = None

    def block(self, i: int, block: nn.Module) -> _Trained:
        if i not in self.blocks:
            layers = {n: dict(_Trainable(m).named_parameters(recurse=False))
                      for n, m in _packed(block)}
            norms = {n: nn.Parameter(m.weight.detach().float().clone())
                     for n, m in _norm_modules(block)}
            self.blocks[i] = _Trained(layers, norms, self.lr)
            self.blocks[i].to(torch.device("cpu"))
        return self.blocks[i]

    def ends(self, norms: list[nn.Module]) -> _Trained:
        if self.post is None:
            self.post = _Trained({}, {n: nn.Parameter(m.weight.detach().float().clone())
                                      for n, m in _norm_modules(_ends(norms))}, self.lr)
        return self.post


def _fit(e2e: E2ETune, provider, teacher: Teacher, state: _State, progress: bool,
         activations: str) -> None:
    gen = torch.Generator().manual_seed(e2e.seed)  # the same windows, step by step, as e2e.run
    n_windows, depth = teacher.windows.shape[0], len(provider)
    *norms, head = provider.post()
    for it in tqdm(range(e2e.iters), desc="tune e2e (block walk)", disable=not progress,
                   leave=False):
        factor = 0.5 * (1 + math.cos(math.pi * it / e2e.iters))
        pick = torch.randperm(n_windows, generator=gen)[: e2e.batch_size]
        inputs = capture(provider, teacher.windows[pick], e2e.batch_size)
        h = inputs.hidden[0]
        # L · B · T · H for the whole depth: on the device if it fits, else disk (not the host)
        where = Activations(provider.device, activations, allow_host=False).place(
            h.numel() * h.element_size() * depth)
        kept: list[Activations] = []
        with torch.no_grad():
            for i in range(depth):
                block = provider.load(i)
                trained = state.block(i, block)
                kept.append(Activations(provider.device, where).fill([h]))
                with _installed(block, trained, provider.device, grad=False):
                    h = _first(block(h, **inputs.at(i).kwargs[0]))
                provider.release(i, block)
        post = state.ends(norms)
        leaf = h.detach().requires_grad_(True)
        with _installed(_ends(norms), post, provider.device, grad=True), torch.enable_grad():
            _kl_sum(_through(norms, leaf), head, teacher, pick, backward=True)
        post.step(factor)
        g = leaf.grad
        for i in reversed(range(depth)):
            block = provider.load(i)
            trained = state.blocks[i]
            x = kept[i][0].detach().requires_grad_(True)
            with _installed(block, trained, provider.device, grad=True), torch.enable_grad():
                torch.autograd.backward(_first(block(x, **inputs.at(i).kwargs[0])), g)
            trained.step(factor)  # on the host, where its tensors and moments live
            g = x.grad
            kept[i] = None
            provider.release(i, block)


# ---- installing the trained values into a loaded block ------------------------------------
@contextmanager
def _installed(block: nn.Module, trained: _Trained, device: torch.device, grad: bool):
    """Block `block` computing with `trained`'s values: packed layers replaced by `_Trainable`s
    holding the trained tensors, norm gains set from their float32 masters (with `grad`, their
    gradients handed to the masters on exit). The block is as it was afterwards, and the trained
    tensors (and gradients) back on the host."""
    trained.to(device)
    packed = _packed(block)
    flags = {p: p.requires_grad for p in block.parameters()}
    for p in block.parameters():
        p.requires_grad_(False)
    saved = []
    try:
        trainables = {name: _trainable(mod, trained.packed[name]) for name, mod in packed}
        with swapped(block, trainables):
            for name, m in _norm_modules(block):
                saved.append((m.weight, m.weight.data))
                m.weight.data = trained.norms[name].detach().to(m.weight.dtype, copy=True)
                m.weight.requires_grad_(grad)
            yield
            if grad:
                for name, m in _norm_modules(block):
                    if m.weight.grad is not None:
                        trained.norms[name].grad = m.weight.grad.float()
    finally:
        for w, data in saved:
            w.data, w.grad = data, None
        for p, flag in flags.items():
            p.requires_grad_(flag)
        trained.to(torch.device("cpu"))


def _ends(post: list[nn.Module]) -> nn.ModuleList:
    """The modules after the last block as one container, named by position (they have no common
    root), so that their norms are trained, installed and written like a block's."""
    return nn.ModuleList(post)


@torch.no_grad()
def _write(block: nn.Module, trained: _Trained) -> None:
    """The trained values into the block's packed buffers and norm gains, in their stored
    formats (scales fp16, factors re-quantised): what `_Trainable.write_back` stores."""
    trained.to(next(iter([*block.parameters(), *block.buffers()])).device)
    for name, mod in _packed(block):
        _trainable(mod, trained.packed[name]).write_back()
    for name, m in _norm_modules(block):
        m.weight.copy_(trained.norms[name].to(m.weight.dtype))
    trained.to(torch.device("cpu"))


@contextmanager
def _written(block: nn.Module, trained: _Trained | None):
    """The block with the trained values written into its formats, put back afterwards."""
    if trained is None:
        yield
        return
    saved = _snapshot(_packed(block), [m.weight for _, m in _norm_modules(block)])
    try:
        _write(block, trained)
        yield
    finally:
        _restore(saved)


def _trainable(mod: CompressedLinear, params: dict[str, nn.Parameter]) -> _Trainable:
    """The trained form of a packed layer holding the walk's own tensors (its codes unpacked)."""
    t = _Trainable(mod)
    for name, p in params.items():
        setattr(t, name, p)
    return t


def _packed(block: nn.Module) -> list[tuple[str, CompressedLinear]]:
    out = [(n, m) for n, m in block.named_modules() if isinstance(m, CompressedLinear)]
    for name, mod in out:
        if mod.kernel is not None:
            raise ValueError(f"{name}: a layer prepared for a kernel has no packed base to tune; "
                             "run tune=e2e before prepare()")
    return out


def _through(norms: list[nn.Module], h: torch.Tensor) -> torch.Tensor:
    for m in norms:
        h = m(h)
    return h


def _first(out):
    return out[0] if isinstance(out, tuple) else out
