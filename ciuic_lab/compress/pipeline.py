"""The sequential block walk: one generic loop for every supported decoder.

    capture block-0 inputs for all calibration windows (stop the forward at block 0)
    for each block:
        hooks collect per-linear stats while the block runs on its inputs
        for each linear: each stage in order edits its LayerState, then it is packed
        re-run the now compressed block: its outputs are the next block's inputs

Re-running the compressed block (GPTQ, arXiv 2210.17323, §4) makes every later layer calibrate on
the activations it will really see, errors of earlier layers included.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ciuic_lab.compress.base import Method
from ciuic_lab.compress.experts import CompressedExperts
from ciuic_lab.compress.linear import CompressedLinear, LayerState
from ciuic_lab.compress.policies import LayerProfile
from ciuic_lab.compress.stats import LayerStats, relative_error
from ciuic_lab.models import adapters


class _StopForward(Exception):
    pass


@dataclass
class CompressionReport:
    layers: list[dict] = field(default_factory=list)  # the per-layer table
    allocations: dict[str, dict] = field(default_factory=dict)  # stage -> {layer: budget}
    seconds: float = 0.0

    def totals(self) -> dict:
        params = sum(r["params"] for r in self.layers)
        nbytes = sum(r["bytes"] for r in self.layers)
        bpp = 8 * nbytes / params if params else float("nan")
        return {"params": params, "bytes": nbytes, "bits_per_param": bpp,
                "ratio_vs_fp16": 16 / bpp if params else float("nan")}


def _block_targets(model: nn.Module) -> list[tuple[int, adapters.Target]]:
    return [(i, t) for i, block in enumerate(adapters.blocks(model)) for t in adapters.targets(block)]


def profile(model: nn.Module) -> list[LayerProfile]:
    """Every compressible weight of the model with its kind and shape, in walk order."""
    return [LayerProfile(f"model.layers.{i}.{t.name}", t.kind, t.shape, i)
            for i, t in _block_targets(model)]


@torch.no_grad()
def profile_pass(model: nn.Module, profiles: list[LayerProfile], windows: torch.Tensor,
                 batch_size: int, needs: frozenset[str]) -> None:
    """Fill profiles[i].extra with the dense weight and (if needed) calibration statistics.

    One forward of the uncompressed model over the calibration windows, hooks on every target:
    the model-wide facts that global policies (OWL, sensitivity) compare across layers before
    any layer is changed.
    """
    tlist = [t for _, t in _block_targets(model)]
    for t, p in zip(tlist, profiles):
        p.extra["weight"] = t.weight.detach()
    if not needs & {"act_norm", "hessian"}:
        return
    # Targets of different blocks share short names: key stats by the full name.
    named = [adapters.Target(p.name, t.kind, t.module, t.expert, t.proj)
             for t, p in zip(tlist, profiles)]
    stats = {t.name: LayerStats(t.shape[1], "hessian" in needs, t.weight.device) for t in named}
    dev = _device_of(model)
    with adapters.collect_stats(named, stats):
        for start in range(0, windows.shape[0], batch_size):
            model(input_ids=windows[start:start + batch_size].to(dev), use_cache=False)
    for p in profiles:
        p.extra["stats"] = stats[p.name]


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def capture_block_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int,
                         device: torch.device | None = None) -> list[tuple[torch.Tensor, dict]]:
    """[(hidden_states, kwargs)] entering block 0, one per calibration batch, on `device`.

    Only what runs before block 0 (embeddings, rotary tables) moves to `device`; the forward is
    stopped at block 0, so the rest of the model may stay where it is (offloaded).
    """
    first = adapters.blocks(model)[0]
    home = _device_of(model)
    device = device or home
    pre = [m for m in (model.model.embed_tokens, getattr(model.model, "rotary_emb", None)) if m]
    captured: list[tuple[torch.Tensor, dict]] = []

    def grab(_mod, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value",
                                                             "use_cache")}
        captured.append((hidden, kw))
        raise _StopForward

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    for m in pre:
        m.to(device)
    try:
        for start in range(0, windows.shape[0], batch_size):
            try:
                model(input_ids=windows[start:start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
        for m in pre:
            m.to(home)
    return captured


def _run_block(block: nn.Module, inputs: list[tuple[torch.Tensor, dict]]) -> list[torch.Tensor]:
    outs = []
    for hidden, kw in inputs:
        out = block(hidden, **kw)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _make_layer(stages: list[Method], state: LayerState, dtype: torch.dtype) -> nn.Module:
    for stage in stages:
        layer = stage.make_layer(state, dtype)
        if layer is not None:
            return layer
    return CompressedLinear.pack(state, dtype)


def _install(block: nn.Module, packed: dict[str, tuple[adapters.Target, CompressedLinear]]) -> None:
    """Swap each compressed target into the block; fused experts become CompressedExperts."""
    experts: dict[str, tuple[nn.Module, dict]] = {}
    for name, (t, mod) in packed.items():
        if t.expert is None:
            _set_submodule(block, name, mod)
        else:
            owner = name.rsplit(".", 2)[0]
            experts.setdefault(owner, (t.module, {}))[1][(t.expert, t.proj)] = mod
    for owner, (orig, parts) in experts.items():
        n = orig.gate_up_proj.shape[0]
        _set_submodule(block, owner, CompressedExperts(
            [parts[(e, "gate_up_proj")] for e in range(n)],
            [parts[(e, "down_proj")] for e in range(n)], orig.act_fn))


def _fallback_stats(t: adapters.Target, moe_inputs: list[torch.Tensor], hessian: bool) \
        -> LayerStats:
    """Statistics of an expert from every token that entered its MoE layer (not only its own)."""
    st = LayerStats(t.shape[1], hessian, t.weight.device)
    for x in moe_inputs:
        st.add_batch(x if t.proj == "gate_up_proj" else adapters.expert_intermediate(t.module, t.expert, x))
    return st


def store_dtype_for(model: nn.Module) -> torch.dtype:
    """16-bit parts keep the model's dtype when it is 16-bit, else fp16."""
    dt = next(model.parameters()).dtype
    return dt if dt in (torch.float16, torch.bfloat16) else torch.float16


@torch.no_grad()
def compress_model(model: nn.Module, windows: torch.Tensor, stages: list[Method],
                   batch_size: int = 1, progress: bool = True,
                   min_expert_tokens: int = 16,
                   device: str | torch.device | None = None) -> CompressionReport:
    """Compress `model` in place with `stages` (in order), calibrating on `windows` (n, seqlen).

    Routed experts calibrate on the tokens their router sends them. An expert that received fewer
    than `min_expert_tokens` tokens falls back to statistics from every token entering its MoE
    layer (its weights still define the down projection's inputs); the report marks it
    (`fallback`) and records each expert's own token count (`calib_tokens`).
    `device`: where blocks are compressed. If it differs from where the model lives (e.g. the
    model on CPU, device="cuda"), the walk is layer-by-layer: one block at a time moves to
    `device` with the calibration activations and goes back compressed, so the working memory
    on `device` is about one block plus activations, not the model.
    Returns the per-layer report; targets become CompressedLinear / CompressedExperts.
    """
    t0 = time.perf_counter()
    profiles = profile(model)
    for stage in stages:  # shape errors now, not after calibrating half the model
        stage.check_shapes(profiles)
    report = CompressionReport()
    needs = frozenset().union(*(s.policy_needs() for s in stages))
    if needs:
        profile_pass(model, profiles, windows, batch_size, needs)
    for stage in stages:
        report.allocations[stage.stage] = stage.allocate(profiles)
    for p in profiles:
        p.extra.clear()  # release the profile statistics before the walk
    want_hessian = any("hessian" in s.needs for s in stages)
    store_dtype = store_dtype_for(model)

    home = _device_of(model)
    dev = torch.device(device) if device is not None else home
    inputs = capture_block_inputs(model, windows, batch_size, dev)
    blocks = adapters.blocks(model)
    bar = tqdm(range(len(blocks)), desc="compress", unit="block", disable=not progress)
    for i in bar:
        block = blocks[i].to(dev)
        tlist = adapters.targets(block)
        stats = {t.name: LayerStats(t.shape[1], want_hessian, dev) for t in tlist}
        moe_inputs: dict = {}
        with adapters.collect_stats(tlist, stats, moe_inputs):
            _run_block(block, inputs)
        packed = {}
        for t in tlist:
            full = f"model.layers.{i}.{t.name}"
            st = stats[t.name]
            fallback = t.expert is not None and st.tokens < min_expert_tokens
            if fallback:
                st = _fallback_stats(t, moe_inputs[t.module], want_hessian)
            state = LayerState.from_linear(t.weight, t.bias)
            for stage in stages:
                budget = report.allocations[stage.stage][full]
                if budget is not None:  # None: `<stage>.layers` leaves this layer out
                    stage.apply(state, st, budget)
            layer = _make_layer(stages, state, store_dtype).to(dev)
            report.layers.append({
                "name": full, "kind": t.kind, "out": t.shape[0], "in": t.shape[1],
                "params": layer.params, "bytes": layer.nbytes(),
                "bits_per_param": 8 * layer.nbytes() / layer.params,
                "sparsity": state.info.get("sparsity", 0.0), "rank": state.info.get("rank", 0),
                "bits": state.info.get("bits", 16),
                "rel_error": relative_error(state.weight, layer.dequantized_weight(), st),
                "calib_tokens": stats[t.name].tokens, "fallback": fallback,
            })
            packed[t.name] = (t, layer)
            del state
        _install(block, packed)
        del stats, moe_inputs, packed
        # Feed the next block with what the compressed block really outputs.
        outs = _run_block(block, inputs)
        inputs = [(o, kw) for o, (_, kw) in zip(outs, inputs)]
        block.to(home)
    report.seconds = time.perf_counter() - t0
    return report
