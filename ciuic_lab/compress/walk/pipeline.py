"""The block walks, one generic loop for every supported decoder, in memory or streamed from disk.

    profile walk (only when a policy needs calibration facts):
        for each block: hooks collect statistics on the dense block's inputs; each policy keeps a
        small per-layer fact (error per width, outlier ratio, spectrum) and the statistics are
        dropped; the dense block's outputs feed the next block
    policies: model-wide goals -> per-layer budgets, seeing every layer's facts
    compress walk:
        for each block: hooks collect statistics; each layer goes through the stages in order and
        is packed; routed experts are calibrated and compressed one at a time (a chunk of experts
        in memory); the compressed block is re-run: its outputs are the next block's inputs

Re-running the compressed block (GPTQ, arXiv 2210.17323, §4) makes every later layer calibrate on
the activations it will really see, errors of earlier layers included. Where a block's weights
come from and where its compressed form goes is the provider's (compress/walk/blocks.py) and the
sink's (`InPlace`, `ToCheckpoint` below) business, both picked once per run (ciuic_lab/hold.py):
the walk holds one block, one chunk of experts and the activations.

Several processes (torchrun; ciuic_lab/dist.py): every walk splits each block's calibration
batches, layers and routed experts among the ranks (compress/walk/distributed.py) and ends with the
bits one process computes; with one process the code below runs exactly as it always did.

Memory of the statistics: a float32 (in × in) Hessian per non-expert layer of the current block
(DeepSeek-V3: 7168² · 4 B = 205 MB each, the 16384-wide o_proj 1 GB) and two for the one expert
being compressed; never every layer's, never every expert's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Self

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ciuic_lab import dist
from ciuic_lab.compress.base import Method
from ciuic_lab.compress.policies import LayerProfile
from ciuic_lab.compress.state import LayerState
from ciuic_lab.compress.stats import LayerStats, relative_error, stats_of
from ciuic_lab.compress.store.experts import CompressedExperts
from ciuic_lab.compress.store.linear import CompressedLinear
from ciuic_lab.compress.walk import distributed as walk_dist
from ciuic_lab.compress.walk.blocks import (
    Activations,
    BlockInputs,
    BlockProvider,
    MoECall,
    Offloaded,
    Resident,
    Streamed,
    add_routed,
    capture,
    dense_forward,
    expert_tokens,
    experts_modules,
    keep_expert_stats,
    recording,
    routed_outputs,
    run_block,
)
from ciuic_lab.models.adapters import Layer, adapter_for, collect_stats, swapped


@dataclass
class CompressionReport:
    layers: list[dict] = field(default_factory=list)  # the per-layer table
    allocations: dict[str, dict] = field(default_factory=dict)  # stage -> {layer: budget}
    seconds: float = 0.0
    profile_seconds: float = 0.0
    tune_seconds: float = 0.0  # part of `seconds`
    tuned: list[dict] = field(default_factory=list)  # per tuned block / routed expert: losses

    def totals(self) -> dict:
        params = sum(r["params"] for r in self.layers)
        nbytes = sum(r["bytes"] for r in self.layers)
        bpp = 8 * nbytes / params if params else float("nan")
        return {"params": params, "bytes": nbytes, "bits_per_param": bpp,
                "ratio_vs_fp16": 16 / bpp if params else float("nan")}


def _named_layers(model: nn.Module) -> list[tuple[str, Layer]]:
    """(full name, Layer) of every compressible weight of the model, in walk order (works on a
    meta skeleton: only shapes are read)."""
    ad = adapter_for(model)
    return [(f"{ad.block_name(i)}.{layer.name}", layer)
            for i, block in enumerate(ad.blocks(model)) for layer in ad.layers(block)]


def profile(model: nn.Module) -> list[LayerProfile]:
    """Every compressible weight of the model with its kind and shape, in walk order."""
    ad = adapter_for(model)
    out = []
    for i, block in enumerate(ad.blocks(model)):
        for layer in ad.layers(block):
            name = f"{ad.block_name(i)}.{layer.name}"
            out.append(LayerProfile(name, layer.kind, layer.shape, i,
                                    sibling=ad.sibling_set(name)))
    return out


def dense_report(model: nn.Module) -> CompressionReport:
    """The report of a model left as it is: each compressible layer at its stored dtype."""
    report = CompressionReport()
    for name, layer in _named_layers(model):
        w = layer.weight
        report.layers.append({"name": name, "kind": layer.kind, "out": w.shape[0],
                              "in": w.shape[1], "params": w.numel(),
                              "bytes": w.numel() * w.element_size(),
                              "bits_per_param": 8.0 * w.element_size(), "sparsity": 0.0,
                              "rank": 0, "bits": 8 * w.element_size(), "rel_error": 0.0})
    return report


def store_dtype_for(model: nn.Module) -> torch.dtype:
    """16-bit parts keep the model's dtype when it is 16-bit, else fp16."""
    dt = next(model.parameters()).dtype
    return dt if dt in (torch.float16, torch.bfloat16) else torch.float16


def _make_layer(methods: list[Method], state: LayerState, dtype: torch.dtype) -> nn.Module:
    """The packed layer for a finished state: a method's own format if it has one (e.g. a
    bitsandbytes baseline), else the lab's CompressedLinear."""
    for method in methods:
        layer = method.make_layer(state, dtype)
        if layer is not None:
            return layer
    return CompressedLinear.pack(state, dtype)


# ---------------------------------------------------------------- routed experts' statistics


# ---------------------------------------------------------------- profile walk


@torch.no_grad()
def profile_walk(provider, windows: torch.Tensor, methods: list[Method],
                 profiles: list[LayerProfile], batch_size: int = 1, expert_chunk: int = 8,
                 min_expert_tokens: int = 16, progress: bool = True,
                 activations: str = "auto") -> None:
    """Fill each profile's `facts` with what the methods' policies keep of the dense model.

    Block by block on the dense model's own activations; each layer's statistics live only until
    its policies have summarised them. A policy that compares layers within a block (OWL) gets a
    second look at the block's weights (routed experts re-read a chunk at a time). Policies that
    read weights only (the global rank budget) get a walk over the weights with no forward."""
    users = [m for m in methods if m.policy_needs()]
    if not users:
        return
    needs = frozenset().union(*(m.policy_needs() for m in users))
    ad = provider.adapter
    by_name = {p.name: p for p in profiles}
    want_stats = bool(needs & {"act_norm", "hessian"})
    hessian = "hessian" in needs
    w = dist.world()  # distributed: this rank's batches, layers and experts (walk/distributed.py)
    inputs = capture(provider, dist.my_windows(windows, batch_size) if w.on else windows,
                     batch_size, activations) if want_stats else None
    for i in tqdm(range(len(provider)), desc="profile", unit="block", disable=not progress):
        block = provider.load(i)
        prefix = ad.block_name(i)

        def keep(name: str, weight: torch.Tensor, stats: LayerStats | None, prefix=prefix) -> None:
            for m in users:
                m.summarize(by_name[f"{prefix}.{name}"], weight, stats)

        here = {x.name: by_name[f"{prefix}.{x.name}"] for x in ad.layers(block)}
        if want_stats and w.on:
            walk_dist.profile_block(provider, i, block, inputs.at(i), keep, here, hessian,
                                    expert_chunk, min_expert_tokens,
                                    -(-windows.shape[0] // batch_size), windows.numel())
        elif want_stats:
            _profile_block(provider, i, block, inputs.at(i), keep, hessian, expert_chunk,
                           min_expert_tokens)
        elif w.on:
            walk_dist.profile_weights_block(provider, i, block, keep, here, expert_chunk)
        else:
            for name, wt in _block_weights(provider, i, block, expert_chunk):
                keep(name, wt, None)
        block_profiles = list(here.values())
        for m in users:
            m.summarize_block(block_profiles, prefix,
                              lambda i=i, block=block: _block_weights(provider, i, block,
                                                                      expert_chunk))
        provider.release(i, block)


def _profile_block(provider, i: int, block: nn.Module, inputs, keep, hessian: bool,
                   expert_chunk: int, min_expert_tokens: int) -> None:
    """Statistics of every layer of one dense block, each handed to `keep` then dropped; the
    block's dense outputs replace `inputs` (routed experts computed a chunk at a time)."""
    ad = provider.adapter
    dense = [x for x in ad.layers(block) if x.expert is None]
    stats = {x.name: LayerStats(x.shape[1], hessian, provider.device) for x in dense}
    with collect_stats(dense, stats), recording(block, ad) as rec:
        run_block(block, inputs)
    for x in dense:
        keep(x.name, x.weight, stats.pop(x.name))
    replay = {}
    for owner, mod in experts_modules(ad, block):
        calls = rec.calls[owner]
        everyone = torch.cat([c.hidden for c in calls])
        outs = [torch.zeros_like(c.hidden) for c in calls]
        for ids, gate_up, down in provider.experts(i, owner, mod).chunks(expert_chunk):
            for j, e in enumerate(ids):
                keep_expert_stats(keep, ad, owner, e, calls, everyone, min_expert_tokens,
                                  gate_up[j], down[j], mod.act_fn, hessian)
                add_routed(ad, outs, calls, e, gate_up[j], down[j], mod.act_fn)
        replay[owner] = outs
    with recording(block, ad, replay):
        inputs.hidden.replace(run_block(block, inputs))


def _block_weights(provider, i: int, block: nn.Module, chunk: int):
    """(layer name within the block, weight) for every layer of a loaded block, experts read
    again a chunk at a time."""
    ad = provider.adapter
    for x in ad.layers(block):
        if x.expert is None:
            yield x.name, x.weight
    gu_name, dn_name = ad.expert_projs
    for owner, mod in experts_modules(ad, block):
        for ids, gate_up, down in provider.experts(i, owner, mod).chunks(chunk):
            for j, e in enumerate(ids):
                yield f"{owner}.{e}.{gu_name}", gate_up[j]
                yield f"{owner}.{e}.{dn_name}", down[j]


# ---------------------------------------------------------------- output Fisher walk


def output_fisher_walk(provider, windows: torch.Tensor, batch_size: int = 1,
                       progress: bool = True, activations: str = "auto",
                       expert_chunk: int = 8) -> dict[str, torch.Tensor]:
    """{layer name: F (out,)}, F_o = Σ_t (∂L/∂y_{t,o})² for the next-token loss L of the dense
    model over `windows`: how much each output channel of each layer matters at the model's
    output (the end-to-end weight of the sensitivity policy's Fisher mode).

    A backward walk: one forward keeps every block's input (in `Activations`: memory, host or
    disk), the loss's gradient is taken after the last block, then blocks are revisited in
    reverse, each re-run with autograd from its stored input to carry the gradient to the block
    before; hooks read each layer's output gradient on the way. Routed experts never enter
    autograd whole: a MoE layer's output is replayed from a chunked computation as a leaf, its
    gradient there is pushed through the experts a chunk at a time (their input gradient, their
    routing weights' gradient, and each expert's own output gradients), and the block's backward
    finishes from the MoE layer's inputs. So it runs on streamed blocks too; memory: the stored
    block inputs (depth × calibration tokens × hidden; on disk unless they fit a GPU:
    `Activations(allow_host=False)`, as host memory is bounded by one block) and one block's
    autograd graph for all calibration batches.
    """
    w = dist.world()
    if w.on:  # this rank's batches; their Fisher terms are added in batch order (walk/distributed.py)
        own = dist.batches(windows.shape[0], batch_size)
        windows = dist.my_windows(windows, batch_size)
    inputs = capture(provider, windows, batch_size, activations)
    stored = [inputs.hidden]
    n = len(provider)
    # 61 blocks × calibration tokens × 7168 for DeepSeek-V3: placed once for the whole depth
    depth_store = Activations(provider.device, activations, allow_host=False).place(
        inputs.hidden.nbytes() * n)
    for i in tqdm(range(n), desc="fisher (forward)", unit="block", disable=not progress):
        block = provider.load(i)
        outs = dense_forward(block, i, provider, inputs.at(i, stored[-1]), expert_chunk)
        stored.append(Activations(provider.device, depth_store).fill(outs))
        provider.release(i, block)
    post = provider.post()
    grads = []
    for b in range(len(inputs)):
        h = stored[-1][b].detach().requires_grad_(True)
        ids = windows[b * batch_size:(b + 1) * batch_size].to(h.device)
        with torch.enable_grad():
            logits = h
            for mod in post:
                logits = mod(logits)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(),
                                   reduction="sum")
            (g,) = torch.autograd.grad(loss, h)
        grads.append(g)
    fisher: dict[str, torch.Tensor] = {}
    for i in tqdm(reversed(range(n)), total=n, desc="fisher (backward)", unit="block",
                  disable=not progress):
        block = provider.load(i)
        acc = walk_dist.PerBatch() if w.on else fisher
        grads = _block_backward(provider, i, block, inputs.at(i, stored[i]), grads, acc,
                                expert_chunk)
        if w.on:
            walk_dist.merge_fisher(acc, own, fisher)
        stored[i + 1] = None
        provider.release(i, block)
    return fisher


class _LeafReplay(nn.Module):
    """Stands in for a fused experts module in an autograd pass: returns the MoE output computed
    beforehand as a leaf that requires grad, and keeps the call's inputs (still in the graph)."""

    def __init__(self, outputs: list[torch.Tensor]):
        super().__init__()
        self.outputs, self.calls = outputs, []

    def forward(self, hidden_states, top_k_index, top_k_weights):
        leaf = self.outputs[len(self.calls)].detach().requires_grad_(True)
        self.calls.append((hidden_states, top_k_index, top_k_weights, leaf))
        return leaf


def _block_backward(provider, i: int, block: nn.Module, inputs: BlockInputs,
                    grads: list[torch.Tensor], fisher: dict, chunk: int) -> list[torch.Tensor]:
    """The loss's gradient at the block's input, per batch, from the one at its output; every
    layer's squared output gradient added to `fisher` on the way."""
    ad = provider.adapter
    prefix = ad.block_name(i)
    owners = experts_modules(ad, block)
    routed = {}
    if owners:  # the MoE outputs, chunked: no expert is in autograd, none need be resident
        with recording(block, ad) as rec:
            run_block(block, inputs)
        routed = {name: routed_outputs(ad, rec.calls[name], provider.experts(i, name, mod), chunk)
                  for name, mod in owners}
    replays = {name: _LeafReplay(outs) for name, outs in routed.items()}
    originals = dict(owners)
    passes = []
    with swapped(block, replays), torch.enable_grad(), _linear_grads(ad, block, prefix, fisher):
        for b, ((x0, kw), g) in enumerate(zip(inputs, grads)):
            _at_batch(fisher, b)
            x = x0.detach().requires_grad_(True)
            out = block(x, **kw)
            y = out[0] if isinstance(out, tuple) else out
            calls = [rep.calls[-1] for rep in replays.values()]
            g_moe = torch.autograd.grad(y, [c[3] for c in calls], g, retain_graph=True) \
                if calls else []
            passes.append((x, y, g, calls, g_moe))
        # the experts' part of the backward, a chunk of experts at a time for all batches
        back = {name: _experts_backward(provider, i, name, originals[name], chunk, fisher,
                                        prefix, [(c[k][0], c[k][1], c[k][2], gm[k])
                                                 for _, _, _, c, gm in passes])
                for k, name in enumerate(replays)}
        new = []
        for b, (x, y, g, calls, _) in enumerate(passes):
            _at_batch(fisher, b)
            outs, grad_outs = [y], [g]
            for k, name in enumerate(replays):
                d_hidden, d_weights = back[name][b]
                outs += [calls[k][0], calls[k][2]]
                grad_outs += [d_hidden, d_weights]
            (gx,) = torch.autograd.grad(outs, x, grad_outs)
            new.append(gx)
    return new


def _experts_backward(provider, i: int, owner: str, mod: nn.Module, chunk: int, fisher: dict,
                      prefix: str, calls: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per recorded call (hidden, index, weights, g at the MoE output): the gradients at the MoE
    input and at the routing weights, with each expert's output gradients added to `fisher`:
    its down projection's is the routing weight times g on its tokens; its gate/up's follows
    through act(gate)·up and the down projection."""
    out = [(torch.zeros_like(h), torch.zeros_like(w)) for h, _, w, _ in calls]
    gu_name, dn_name = provider.adapter.expert_projs
    for ids, gate_up, down in provider.experts(i, owner, mod).chunks(chunk):
        for j, e in enumerate(ids):
            for b, ((h, index, w, g), (d_h, d_w)) in enumerate(zip(calls, out)):
                _at_batch(fisher, b)
                tok, kpos = torch.where(index == e)
                if tok.numel() == 0:
                    continue
                with torch.enable_grad():
                    x = h[tok].detach().requires_grad_(True)
                    z = F.linear(x, gate_up[j].to(x.dtype))
                    gate, up = z.chunk(2, dim=-1)
                    y = F.linear(mod.act_fn(gate) * up, down[j].to(x.dtype))
                    g_down = g[tok] * w[tok, kpos, None].detach()
                    gx, gz = torch.autograd.grad(y, [x, z], g_down.to(y.dtype))
                _add_sq(fisher, f"{prefix}.{owner}.{e}.{dn_name}", g_down)
                _add_sq(fisher, f"{prefix}.{owner}.{e}.{gu_name}", gz)
                d_h.index_add_(0, tok, gx.to(d_h.dtype))
                d_w[tok, kpos] += (g[tok] * y.detach()).sum(-1).to(d_w.dtype)
    return out


def _add_sq(fisher: dict, name: str, g: torch.Tensor) -> None:
    sq = (g.detach().float() ** 2).reshape(-1, g.shape[-1]).sum(0)
    if isinstance(fisher, walk_dist.PerBatch):  # distributed: summed later, in batch order
        fisher.add(name, sq)
        return
    fisher[name] = fisher[name] + sq if name in fisher else sq


def _at_batch(fisher, b: int) -> None:
    """Tell a distributed run's accumulator which of its batches the next terms belong to."""
    if isinstance(fisher, walk_dist.PerBatch):
        fisher.batch = b


class _linear_grads:
    """Context: each nn.Linear layer's squared output gradient added to `fisher` in backward."""

    def __init__(self, ad, block: nn.Module, prefix: str, fisher: dict):
        self.layers = [x for x in ad.layers(block) if x.expert is None]
        self.prefix, self.fisher, self.handles = prefix, fisher, []

    def __enter__(self):
        for x in self.layers:
            def hook(_m, _a, out, name=f"{self.prefix}.{x.name}") -> None:
                out.register_hook(lambda g: _add_sq(self.fisher, name, g))

            self.handles.append(x.module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------- compress walk


class _Compressor:
    """One layer through the stages, packed, with its row of the per-layer table."""

    def __init__(self, methods: list[Method], allocations: dict, store_dtype: torch.dtype,
                 device: torch.device, report: CompressionReport, keep_states: bool = False,
                 rank: int | None = None):
        self.methods, self.allocations = methods, allocations
        self.store_dtype, self.device, self.report = store_dtype, device, report
        # tuning needs each layer's unpacked parts until its block is tuned: one block's worth
        self.keep_states, self.states = keep_states, {}
        # distributed: each row says which rank compressed the layer and how long it took, so
        # the balance of the split can be read from the table
        self.rank = rank

    def __call__(self, full: str, kind: str, weight: torch.Tensor, bias, stats: LayerStats,
                 fallback: bool, own_tokens: int) -> nn.Module:
        t0 = time.perf_counter()
        state = LayerState.from_linear(weight, bias, name=full)
        for method in self.methods:
            budget = self.allocations[method.stage][full]
            if budget is not None:  # None: `<stage>.layers` leaves this layer out
                method.apply(state, stats, budget)
        layer = _make_layer(self.methods, state, self.store_dtype).to(self.device)
        if self.keep_states and isinstance(layer, CompressedLinear):
            self.states[full] = state
        self.report.layers.append({
            "name": full, "kind": kind, "out": weight.shape[0], "in": weight.shape[1],
            "params": layer.params, "bytes": layer.nbytes(),
            "bits_per_param": 8 * layer.nbytes() / layer.params,
            "sparsity": state.info.get("sparsity", 0.0), "rank": state.info.get("rank", 0),
            "bits": state.info.get("bits", 16),
            "rel_error": relative_error(state.weight, layer.dequantized_weight(), stats),
            "calib_tokens": own_tokens, "fallback": fallback,
        })
        if self.rank is not None:
            self.report.layers[-1].update(dist_rank=self.rank, layer_s=time.perf_counter() - t0)
        return layer


@torch.no_grad()
def compress_walk(provider, windows: torch.Tensor, methods: list[Method], allocations: dict,
                  report: CompressionReport, batch_size: int = 1, min_expert_tokens: int = 16,
                  expert_chunk: int = 8, progress: bool = True, activations: str = "auto",
                  sink: Sink | None = None, tune=None) -> None:
    """Compress every block of `provider` in order; `sink.put(i, block)` takes each finished
    block (default: `InPlace`, the provider keeps it). `tune` (a `tune.block.BlockTune`): after
    each block's stages, tune its packed layers against the dense block's output (which needs the
    dense path's activations beside the compressed path's)."""
    sink = sink or InPlace(provider)
    ad = provider.adapter
    want_hessian = any("hessian" in m.needs for m in methods)
    w = dist.world()
    if w.on and tune is not None:
        raise ValueError("tune: block tuning is not distributed yet; run it in one process")
    compress_one = _Compressor(methods, allocations, store_dtype_for(provider.model),
                               provider.device, report, keep_states=tune is not None,
                               rank=w.rank if w.on else None)
    # Distributed: this rank's calibration batches only (data-parallel; walk/distributed.py).
    inputs = capture(provider, dist.my_windows(windows, batch_size) if w.on else windows,
                     batch_size, activations)
    dense_path = None
    if tune is not None:  # a second copy of the activations: the dense model's own
        dense_path = Activations(provider.device, activations).fill(
            [inputs.hidden[k] for k in range(len(inputs))])
    bar = tqdm(range(len(provider)), desc="compress", unit="block", disable=not progress)
    for i in bar:
        t0, first_row = time.perf_counter(), len(report.layers)
        block = provider.load(i)
        here = inputs.at(i)
        prefix = ad.block_name(i)
        layers = ad.layers(block)
        order = {f"{prefix}.{x.name}": k for k, x in enumerate(layers)}  # the report's row order
        targets = None
        if tune is not None:  # what the dense block outputs on the dense path
            targets = Activations(provider.device, activations).fill(dense_forward(
                block, i, provider, inputs.at(i, dense_path), expert_chunk))
        if w.on:
            stats = rec = None
            packed = walk_dist.compress_block(provider, i, block, here, prefix, compress_one,
                                              want_hessian, min_expert_tokens, expert_chunk,
                                              -(-windows.shape[0] // batch_size), windows.numel(),
                                              _compress_experts)
        else:
            dense = [x for x in layers if x.expert is None]
            stats = {x.name: LayerStats(x.shape[1], want_hessian, provider.device) for x in dense}
            with collect_stats(dense, stats), recording(block, ad) as rec:
                run_block(block, here)
            packed = {}
            for x in dense:
                st = stats.pop(x.name)
                packed[x.name] = (x, compress_one(f"{prefix}.{x.name}", x.kind, x.weight, x.bias,
                                                  st, False, st.tokens))
            tuned = {}
            for owner, mod in experts_modules(ad, block):
                packed.update(_compress_experts(provider, i, owner, mod, rec.calls[owner],
                                                compress_one, prefix, want_hessian,
                                                min_expert_tokens, expert_chunk, tune, tuned))
        ad.install(block, packed, CompressedExperts)
        if tune is not None:
            states = {name: compress_one.states.pop(f"{prefix}.{name}") for name in packed
                      if f"{prefix}.{name}" in compress_one.states}
            own = {n: p for n, p in packed.items() if p[0].expert is None}
            info = tune.tune_block(block, own, states, here, targets,
                                   compress_one.store_dtype)
            packed.update(own)  # the tuned layers, where tuning was kept
            report.tune_seconds += info["seconds"]
            if "loss_before" in info:
                report.tuned.append({"unit": prefix, **info})
            tuned.update({f"{prefix}.{n}": info for n in states})  # the block's own layers
            _tuned_rows(report.layers[first_row:], tuned, packed, prefix)
            dense_path = targets  # the dense outputs are the next block's dense inputs
            compress_one.states.clear()
            del states
        del stats, rec, packed
        # Feed the next block with what the compressed block really outputs.
        inputs.hidden.replace(run_block(block, here))
        sink.put(i, block)
        seconds = time.perf_counter() - t0
        report.layers[first_row:] = sorted(report.layers[first_row:], key=lambda r: order[r["name"]])
        for row in report.layers[first_row:]:
            row["block_s"] = seconds


def _compress_experts(provider, i: int, owner: str, mod: nn.Module, calls: list[MoECall],
                      compress_one: _Compressor, prefix: str, hessian: bool,
                      min_expert_tokens: int, chunk: int, tune=None,
                      tuned: dict | None = None, only: list[int] | None = None) -> dict:
    """Each routed expert of one MoE layer, calibrated on the tokens its router sent it: gate/up
    on those tokens, down on act(gate)·up of its own compressed gate/up. An expert with fewer
    than `min_expert_tokens` falls back to every token that entered the layer. Two Hessians
    alive at a time; a chunk of experts' dense weights in memory. With `tune`, each expert is
    then tuned on the same tokens against its dense output (`tuned` gets its losses). `only`:
    just these experts (a rank's share; the others are not even read)."""
    everyone = torch.cat([c.hidden for c in calls])
    projs = provider.adapter.expert_projs  # (gate/up, down)
    packed = {}
    for ids, gate_up, down in provider.experts(i, owner, mod).chunks(chunk, only):
        for j, e in enumerate(ids):
            x, own, fallback = expert_tokens(calls, e, everyone, min_expert_tokens)
            names = tuple(f"{owner}.{e}.{p}" for p in projs)
            gu = compress_one(f"{prefix}.{names[0]}", "expert", gate_up[j], None,
                              stats_of(x, hessian), fallback, own)
            inter = provider.adapter.expert_intermediate(x, gu.dequantized_weight(x.dtype),
                                                         mod.act_fn)
            dn = compress_one(f"{prefix}.{names[1]}", "expert", down[j], None,
                              stats_of(inter, hessian), fallback, own)
            if tune is not None and f"{prefix}.{names[0]}" in compress_one.states:
                full = [f"{prefix}.{n}" for n in names]
                ad = provider.adapter
                target = ad.expert_mlp(x, gate_up[j], down[j], mod.act_fn)

                def mlp(xs, gu_w, dn_w, ad=ad, act=mod.act_fn):
                    return ad.expert_mlp(xs, gu_w, dn_w, act)

                gu, dn, info = tune.tune_expert(
                    compress_one.states.pop(full[0]), compress_one.states.pop(full[1]), x,
                    target, mlp, compress_one.store_dtype, (gu, dn))
                compress_one.report.tune_seconds += info["seconds"]
                if "loss_before" in info:
                    compress_one.report.tuned.append({"unit": f"{prefix}.{owner}.{e}", **info})
                tuned.update({n: info for n in full})
            packed[names[0]] = (Layer(names[0], "expert", mod, e, projs[0]), gu)
            packed[names[1]] = (Layer(names[1], "expert", mod, e, projs[1]), dn)
    return packed


def _tuned_rows(rows: list[dict], tuned: dict, packed: dict, prefix: str) -> None:
    """Each tuned layer's row: the tuning loss before and after (its block's, or its routed
    expert's), and its error and bytes as packed after tuning (unchanged bytes by design)."""
    for row in rows:
        info = tuned.get(row["name"])
        if info is None or "loss_before" not in info:
            continue
        row["tune_loss_before"], row["tune_loss_after"] = info["loss_before"], info["loss_after"]
        row["tune_kept"] = info["kept"]
        mod = packed.get(row["name"][len(prefix) + 1:], (None, None))[1]
        if mod is not None:
            row["bytes"] = mod.nbytes()


# ---------------------------------------------------------------- where compressed blocks go


class Sink(Protocol):
    """Where the compress walk puts each finished block, so the walk never asks how the model is
    held. A context: a write that fails leaves nothing half-made behind."""

    path: Path | None  # the compressed checkpoint, once finished (None: none is written)

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc) -> None: ...

    def put(self, i: int, block: nn.Module) -> None:
        """Block i, compressed: the walk is done with it."""

    def finish(self) -> None:
        """Every block is in: complete the result."""


class InPlace:
    """The compressed layers stay installed in the model the provider holds (memory, offload):
    the model is the result."""

    path = None

    def __init__(self, provider):
        self.provider = provider

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def put(self, i: int, block: nn.Module) -> None:
        self.provider.release(i, block)

    def finish(self) -> None:
        pass


class ToCheckpoint:
    """Each compressed block written as its own shard the moment it is finished, then dropped
    (compress.stream): host memory holds one packed block whatever the depth, and the model is
    never whole anywhere. `path`, or a function giving it (resolved when the write starts, so a
    run that fails before writes nothing). Rank 0 writes; the other ranks walk the same blocks
    and wait until the checkpoint is complete, after which every rank may read it."""

    def __init__(self, provider, path: Path | str | Callable[[], Path], dtype: torch.dtype):
        self.provider, self._where, self.dtype = provider, path, dtype
        self.path: Path | None = None
        self.writer = None

    def __enter__(self) -> Self:
        from ciuic_lab.compress.store.checkpoint import CheckpointWriter

        self.path = Path(self._where() if callable(self._where) else self._where)
        if dist.world().main:
            self.writer = CheckpointWriter(self.path, self.provider.model.config, self.dtype)
        return self

    def __exit__(self, *exc) -> None:
        if self.writer is not None:
            self.writer.__exit__(*exc)

    def put(self, i: int, block: nn.Module) -> None:
        from ciuic_lab.compress.store.checkpoint import block_shard

        if self.writer is not None:
            self.writer.add(block_shard(i), block, self.provider.adapter.block_name(i))
        self.provider.release(i, block)

    def finish(self) -> None:
        from ciuic_lab.compress.store.checkpoint import REST, outside_blocks

        if self.writer is not None:
            self.writer.add_tensors(REST, outside_blocks(self.provider.model))
            self.writer.finish()
        dist.barrier()  # rank 0 has written it: it can be read from here on


# ---------------------------------------------------------------- entry points


def plan(provider, windows: torch.Tensor, methods: list[Method], batch_size: int = 1,
         expert_chunk: int = 8, min_expert_tokens: int = 16, progress: bool = True,
         activations: str = "auto") -> CompressionReport:
    """Shape checks, the profile walk if a policy needs one, and every stage's allocation."""
    profiles = profile(provider.model)
    for method in methods:  # shape errors now, not after calibrating half the model
        method.check_shapes(profiles)
    report = CompressionReport()
    t0 = time.perf_counter()
    grad_users = [m for m in methods if "output_grad" in m.policy_needs()]
    if grad_users:
        fisher = output_fisher_walk(provider, windows, batch_size, progress, activations,
                                    expert_chunk)
        for p in profiles:
            for m in grad_users:
                p.facts.setdefault(m.stage, {})["output_fisher"] = fisher[p.name]
    profile_walk(provider, windows, methods, profiles, batch_size, expert_chunk,
                 min_expert_tokens, progress, activations)
    report.profile_seconds = time.perf_counter() - t0
    for method in methods:
        report.allocations[method.stage] = method.allocate(profiles)
    return report


@torch.no_grad()
def compress(provider: BlockProvider, windows: torch.Tensor, methods: list[Method], sink: Sink,
             batch_size: int = 1, progress: bool = True, min_expert_tokens: int = 16,
             expert_chunk: int = 8, activations: str = "auto", tune=None) -> CompressionReport:
    """The one entry: compress `provider`'s model with `methods` (in order), calibrating on
    `windows` (n, seqlen), each finished block handed to `sink`. Layers become packed layers;
    fused routed experts become CompressedExperts.

    Routed experts calibrate on the tokens their router sends them; one with fewer than
    `min_expert_tokens` falls back to every token entering its MoE layer (the report marks it
    `fallback` and records its own token count, `calib_tokens`).

    Memory is the provider's and the sink's: a walk holds one block, one chunk of `expert_chunk`
    routed experts, one block's statistics and the calibration activations; the profile walk
    (when a policy needs it) reads every block once more.
    """
    t0 = time.perf_counter()
    report = plan(provider, windows, methods, batch_size, expert_chunk, min_expert_tokens,
                  progress, activations)
    with sink:
        compress_walk(provider, windows, methods, report.allocations, report, batch_size,
                      min_expert_tokens, expert_chunk, progress, activations, sink, tune)
        sink.finish()
    report.seconds = time.perf_counter() - t0
    return report


def compress_model(model: nn.Module, windows: torch.Tensor, methods: list[Method],
                   batch_size: int = 1, progress: bool = True, min_expert_tokens: int = 16,
                   device: str | torch.device | None = None, expert_chunk: int = 8,
                   activations: str = "auto", tune=None) -> CompressionReport:
    """`compress` of an in-memory `model`, in place (tests, scripts). `device`: where blocks are
    compressed; if it differs from where the model lives (the model on CPU, device="cuda"), one
    block at a time moves to `device` and goes back compressed (`Offloaded`)."""
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    provider = (Resident if device == home else Offloaded)(model, device)
    return compress(provider, windows, methods, InPlace(provider), batch_size, progress,
                    min_expert_tokens, expert_chunk, activations, tune)


def compress_streamed(name_or_path: str, out_dir, windows: torch.Tensor, methods: list[Method],
                      device: torch.device, dtype: torch.dtype, batch_size: int = 1,
                      progress: bool = True, min_expert_tokens: int = 16, expert_chunk: int = 8,
                      activations: str = "auto", trust_remote_code: bool = False,
                      revision: str | None = None, source=None,
                      transform=None, tune=None) -> CompressionReport:
    """`compress` of a checkpoint that never has to fit in memory (tests, scripts): `Streamed`
    blocks read from its shards (FP8 dequantised on `device`), written `ToCheckpoint(out_dir)` as
    they finish. `transform` edits the weights as they load (`rotate.streamed.StreamedRotation`)."""
    provider = streamed(name_or_path, device, dtype, trust_remote_code, revision, source,
                        transform)
    return compress(provider, windows, methods, ToCheckpoint(provider, out_dir, dtype),
                    batch_size, progress, min_expert_tokens, expert_chunk, activations, tune)


def streamed(name_or_path: str, device: torch.device, dtype: torch.dtype,
             trust_remote_code: bool = False, revision: str | None = None, source=None,
             transform=None) -> Streamed:
    """A `Streamed` provider over a checkpoint: its skeleton, its shards (every one checked)."""
    from ciuic_lab.models.loader import skeleton
    from ciuic_lab.models.source import CheckpointSource

    source = source or CheckpointSource.open(name_or_path, revision)
    return Streamed(skeleton(name_or_path, dtype, trust_remote_code, revision), source, device,
                    transform)
