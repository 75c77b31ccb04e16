"""The block walks' steps when several processes share one run (ciuic_lab/dist.py: the world).

One process, for a block, runs every calibration batch through it with hooks accumulating each
layer's statistics, then compresses (or profiles) every layer and routed expert. Here:

    data-parallel   batch b of the calibration windows lives on rank b mod N, which alone runs
                    it through the block; the statistics of every batch reach the rank that
                    owns the layer in batch order (`exchange`)
    work-parallel   the block's layers, then its routed experts, are divided by cost
                    (`dist.assign`, the same split computed on every rank); each rank
                    compresses or profiles its own; the results (packed layers, policy facts)
                    are shared, so every rank continues with the same block and the same facts

Why not all_reduce partial statistics: float sums in another order differ in their last bits,
and GPTQ's, SparseGPT's and the policies' choices can follow those bits; the exchange below
makes each owner's sums in exactly one process's order, so N processes store the same bytes as
one (tests/test_dist.py). Its cost: every batch's layer inputs travel to every rank once (a
few times the activations per block; one batch's worth held at a time), and the MoE layers'
recorded inputs and routing of every batch are kept on every rank (as one process keeps them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ciuic_lab import dist
from ciuic_lab.compress.stats import LayerStats
from ciuic_lab.compress.store.formats import format_class
from ciuic_lab.compress.walk.blocks import (
    BlockInputs,
    MoECall,
    add_routed,
    experts_modules,
    keep_expert_stats,
    recording,
    run_block,
)
from ciuic_lab.models.adapters import Layer, collect_stats


class _Inputs:
    """Stands in for a LayerStats under `collect_stats`: keeps each call's inputs as they are,
    to be shared with the rank that owns the layer's statistics."""

    def __init__(self):
        self.xs: list[torch.Tensor] = []

    def add_batch(self, x: torch.Tensor) -> None:
        self.xs.append(x.detach())


@dataclass
class Exchanged:
    stats: dict[str, LayerStats]  # the dense layers this rank owns: over every batch
    mine: set[str]  # their names
    loads: list[float]  # each rank's cost so far (experts are split on top of it)
    calls: dict[str, list[MoECall]]  # per experts module: every batch's, in batch order
    local: dict[str, list[MoECall]] = field(default_factory=dict)  # this rank's batches'


def exchange(block: nn.Module, here: BlockInputs, ad, hessian: bool, n_batches: int,
             tokens: int, device: torch.device) -> Exchanged:
    """Run this rank's batches through the dense `block` and share what each batch gives.

    Round k: every rank runs its k-th batch (global batch k·N + rank) with hooks that keep the
    dense layers' inputs and recorders that keep the MoE layers' inputs and routing; then each
    rank's batch is shared in rank order, which is batch order, and the owner of each dense
    layer adds it to its statistics (`LayerStats.add_batch`, as one process does per batch)."""
    w = dist.world()
    dense = [x for x in ad.layers(block) if x.expert is None]
    owner, loads = dist.assign([dist.weight_cost(x.shape[0], x.shape[1], tokens) for x in dense])
    mine = {x.name for x, r in zip(dense, owner) if r == w.rank}
    stats = {x.name: LayerStats(x.shape[1], hessian, device) for x in dense if x.name in mine}
    moe = [name for name, _ in experts_modules(ad, block)]
    out = Exchanged(stats, mine, loads, {n: [] for n in moe}, {n: [] for n in moe})
    for k in range(-(-n_batches // w.size)):
        payload = {}
        if k < len(here):
            seen = {x.name: _Inputs() for x in dense}
            with collect_stats(dense, seen), recording(block, ad) as rec:
                block(here.hidden[k], **here.kwargs[k])
            payload = {f"in/{n}/{j}": x for n, s in seen.items() for j, x in enumerate(s.xs)}
            for name, cs in rec.calls.items():
                out.local[name] += cs
                for j, c in enumerate(cs):
                    payload.update({f"moe/{name}/{j}/h": c.hidden, f"moe/{name}/{j}/i": c.index,
                                    f"moe/{name}/{j}/w": c.weights})
            del seen, rec
        for r in range(min(w.size, n_batches - k * w.size)):
            _, got = dist.share(None, payload if r == w.rank else None, src=r)
            for x in dense:
                if x.name in mine:
                    j = 0
                    while f"in/{x.name}/{j}" in got:
                        stats[x.name].add_batch(got[f"in/{x.name}/{j}"].to(device))
                        j += 1
            for name in moe:
                j = 0
                while f"moe/{name}/{j}/h" in got:
                    out.calls[name].append(MoECall(*(got[f"moe/{name}/{j}/{p}"].to(device)
                                                     for p in "hiw")))
                    j += 1
            del got
        del payload
    return out


def expert_owners(block: nn.Module, ad, calls: dict[str, list[MoECall]], min_expert_tokens: int,
                  loads: list[float]) -> dict[str, list[int]]:
    """{experts module: the experts this rank owns}: split by cost on top of `loads`, an
    expert's cost from the tokens routed to it (every token of the layer when it falls back),
    which every rank counts alike from the shared routing."""
    w = dist.world()
    units = []
    gu_name, dn_name = ad.expert_projs
    for name, mod in experts_modules(ad, block):
        gate_up, down = getattr(mod, gu_name), getattr(mod, dn_name)
        n_exp = gate_up.shape[0]
        counts = torch.zeros(n_exp, dtype=torch.long)
        for c in calls[name]:  # an expert appears at most once among a token's top-k
            counts += torch.bincount(c.index.flatten().cpu(), minlength=n_exp)[:n_exp]
        everyone = sum(c.hidden.shape[0] for c in calls[name])
        two_i, h = gate_up.shape[1:]
        for e in range(n_exp):
            t = int(counts[e]) if int(counts[e]) >= min_expert_tokens else everyone
            units.append((name, e, dist.weight_cost(two_i, h, t)
                          + dist.weight_cost(h, down.shape[2], t)))
    owner, _ = dist.assign([u[2] for u in units], loads=loads)
    out: dict[str, list[int]] = {name: [] for name, _ in experts_modules(ad, block)}
    for (name, e, _), r in zip(units, owner):
        if r == w.rank:
            out[name].append(e)
    return out


# ---------------------------------------------------------------- compress walk


def compress_block(provider, i: int, block: nn.Module, here: BlockInputs, prefix: str,
                   compress_one, hessian: bool, min_expert_tokens: int, chunk: int,
                   n_batches: int, tokens: int, compress_experts) -> dict:
    """{layer name: (Layer, packed layer)} for every layer of block i, the same bits on every
    rank as one process computes: statistics exchanged, this rank's layers and experts
    compressed (only its own experts' weights are read), then every rank's packed layers
    shared from it in rank order and rebuilt from their bits (nothing is recompressed); the
    rows of the per-layer table travel with them. `compress_experts` is the walk's own
    routed-expert step (pipeline._compress_experts), restricted here to this rank's experts."""
    w = dist.world()
    ad = provider.adapter
    layers = ad.layers(block)
    dense = {x.name: x for x in layers if x.expert is None}
    ex = exchange(block, here, ad, hessian, n_batches, tokens, provider.device)
    own_experts = expert_owners(block, ad, ex.calls, min_expert_tokens, ex.loads)
    report = compress_one.report
    first_row = len(report.layers)
    packed = {}
    for name, x in dense.items():
        if name in ex.mine:
            st = ex.stats.pop(name)
            packed[name] = (x, compress_one(f"{prefix}.{name}", x.kind, x.weight, x.bias, st,
                                            False, st.tokens))
    moe = dict(experts_modules(ad, block))
    for name, mod in moe.items():
        if own_experts[name]:
            packed.update(compress_experts(provider, i, name, mod, ex.calls[name], compress_one,
                                           prefix, hessian, min_expert_tokens, chunk,
                                           only=own_experts[name]))
    del ex
    rows = report.layers[first_row:]
    del report.layers[first_row:]
    for r in range(w.size):  # every rank's packed layers, on every rank, in rank order
        specs, tensors = packed_payload({n: m for n, (_, m) in packed.items()}) \
            if r == w.rank else (None, None)
        (specs, their_rows), tensors = dist.share((specs, rows) if r == w.rank else None,
                                                  tensors, src=r)
        report.layers.extend(their_rows)
        if r == w.rank:
            continue
        for n, m in packed_modules(specs, tensors, provider.device).items():
            if n in dense:
                packed[n] = (dense[n], m)
            else:
                owner_name, e, proj = n.rsplit(".", 2)
                packed[n] = (Layer(n, "expert", moe[owner_name], int(e), proj), m)
        del tensors
    return packed


# ---------------------------------------------------------------- profile walk


def profile_block(provider, i: int, block: nn.Module, here: BlockInputs, keep, profiles: dict,
                  hessian: bool, chunk: int, min_expert_tokens: int, n_batches: int,
                  tokens: int) -> None:
    """The profile walk's block on several ranks: statistics exchanged, this rank's layers and
    experts summarised by the policies (`keep`), the new facts shared so every rank holds all
    of them (`profiles`: the block's LayerProfiles by layer name), and this rank's batches'
    dense outputs replacing `here`. The dense outputs need every routed expert for this rank's
    tokens, so here every rank reads all of them (a chunk at a time), as one process does."""
    ad = provider.adapter
    before = _fact_keys(profiles)
    ex = exchange(block, here, ad, hessian, n_batches, tokens, provider.device)
    for x in ad.layers(block):
        if x.expert is None and x.name in ex.mine:
            keep(x.name, x.weight, ex.stats.pop(x.name))
    own_experts = expert_owners(block, ad, ex.calls, min_expert_tokens, ex.loads)
    replay = {}
    for owner, mod in experts_modules(ad, block):
        calls, local = ex.calls[owner], ex.local[owner]
        everyone = torch.cat([c.hidden for c in calls])
        outs = [torch.zeros_like(c.hidden) for c in local]
        mine = set(own_experts[owner])
        for ids, gate_up, down in provider.experts(i, owner, mod).chunks(chunk):
            for j, e in enumerate(ids):
                if e in mine:
                    keep_expert_stats(keep, ad, owner, e, calls, everyone, min_expert_tokens,
                                      gate_up[j], down[j], mod.act_fn, hessian)
                add_routed(ad, outs, local, e, gate_up[j], down[j], mod.act_fn)
        replay[owner] = outs
    del ex
    share_facts(profiles, before)
    with recording(block, ad, replay):
        here.hidden.replace(run_block(block, here))


def profile_weights_block(provider, i: int, block: nn.Module, keep, profiles: dict,
                          chunk: int) -> None:
    """Policies that read weights only (the global rank budget's spectra): each rank
    summarises its share of the block's layers and experts (split by size), reading only its
    own experts, and the facts are shared."""
    ad = provider.adapter
    before = _fact_keys(profiles)
    dense = [x for x in ad.layers(block) if x.expert is None]
    owner, loads = dist.assign([dist.weight_cost(x.shape[0], x.shape[1], 0) for x in dense])
    for x, r in zip(dense, owner):
        if r == dist.world().rank:
            keep(x.name, x.weight, None)
    no_tokens = {name: [] for name, _ in experts_modules(ad, block)}
    own_experts = expert_owners(block, ad, no_tokens, 0, loads)
    for name, mod in experts_modules(ad, block):
        if own_experts[name]:
            for ids, gate_up, down in provider.experts(i, name, mod).chunks(chunk,
                                                                            own_experts[name]):
                for j, e in enumerate(ids):
                    for proj, w in zip(ad.expert_projs, (gate_up[j], down[j])):
                        keep(f"{name}.{e}.{proj}", w, None)
    share_facts(profiles, before)


def _fact_keys(profiles: dict) -> dict:
    return {n: {s: set(f) for s, f in p.facts.items()} for n, p in profiles.items()}


def share_facts(profiles: dict, before: dict) -> None:
    """Every rank's new policy facts (keys its `keep` calls added), on every rank. Tensors go
    to the CPU on the way (pickled by all_gather_object; policies keep their facts there)."""
    mine = {}
    for n, p in profiles.items():
        new = {s: {k: _cpu(v) for k, v in f.items() if k not in before[n].get(s, ())}
               for s, f in p.facts.items()}
        new = {s: f for s, f in new.items() if f}
        if new:
            mine[n] = new
    for theirs in dist.gather_objects(mine):
        for n, by_stage in theirs.items():
            for s, f in by_stage.items():
                profiles[n].facts.setdefault(s, {}).update(f)


def _cpu(v):
    if isinstance(v, torch.Tensor):
        return v.cpu()
    if isinstance(v, dict):
        return {k: _cpu(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_cpu(x) for x in v)
    return v


# ---------------------------------------------------------------- output Fisher walk


class PerBatch:
    """The Fisher walk's accumulator on one rank: each layer's squared output gradients kept
    per (local batch, call) instead of summed, until `merge_fisher` adds them in batch order."""

    def __init__(self):
        self.batch = 0
        self.parts: dict[str, dict[int, list[torch.Tensor]]] = {}

    def add(self, name: str, sq: torch.Tensor) -> None:
        self.parts.setdefault(name, {}).setdefault(self.batch, []).append(sq)


def merge_fisher(acc: PerBatch, own: list[int], fisher: dict) -> None:
    """Add one block's per-batch Fisher terms of every rank to `fisher`, layer by layer in
    global batch order, as one process adds them (`pipeline._add_sq`): the same bits."""
    w = dist.world()
    terms: dict[str, dict[int, list[torch.Tensor]]] = {}
    for r in range(w.size):
        payload = None
        if r == w.rank:
            payload = {f"{name}|{own[k]}|{j}": sq for name, by_b in acc.parts.items()
                       for k, sqs in by_b.items() for j, sq in enumerate(sqs)}
        _, got = dist.share(None, payload, src=r)
        for key, sq in got.items():
            name, b, j = key.rsplit("|", 2)
            terms.setdefault(name, {}).setdefault(int(b), []).append((int(j), sq))
    for name, by_b in terms.items():
        for b in sorted(by_b):
            for _, sq in sorted(by_b[b], key=lambda t: t[0]):
                fisher[name] = fisher[name] + sq if name in fisher else sq


# ---------------------------------------------------------------- packed layers


def packed_payload(mods: dict[str, nn.Module]) -> tuple[dict, dict[str, torch.Tensor]]:
    """({name: spec}, {name/buffer: tensor}) of packed layers (the checkpoint's contract:
    `spec()` and the buffers `shell(spec, shapes)` loads), ready for `share`."""
    specs, tensors = {}, {}
    for name, mod in mods.items():
        specs[name] = mod.spec()
        for k, t in mod.state_dict().items():
            tensors[f"{name}/{k}"] = t
    return specs, tensors


def packed_modules(specs: dict, tensors: dict[str, torch.Tensor],
                   device: torch.device) -> dict[str, nn.Module]:
    """The packed layers `packed_payload` described, rebuilt from their bits on `device` (an
    empty shell of each format, then a strict load of its buffers: nothing is recompressed)."""
    out = {}
    for name, spec in specs.items():
        prefix = f"{name}/"
        state = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
        shapes = {k: (tuple(t.shape), t.dtype) for k, t in state.items() if "." not in k}
        mod = format_class(spec["format"]).shell(spec, shapes)
        mod.load_state_dict(state, strict=True, assign=True)
        out[name] = mod.to(device)
    return out
