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
from ciuic_lab.compress.linear import CompressedLinear
from ciuic_lab.compress.policies import LayerProfile
from ciuic_lab.compress.state import LayerState
from ciuic_lab.compress.stats import LayerStats, relative_error
from ciuic_lab.models.adapters import DecoderAdapter, Layer, adapter_for, collect_stats


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


def _block_layers(model: nn.Module) -> list[tuple[str, Layer]]:
    """(full name, Layer) of every compressible weight of the model, in walk order."""
    ad = adapter_for(model)
    return [(f"{ad.block_name(i)}.{layer.name}", layer)
            for i, block in enumerate(ad.blocks(model)) for layer in ad.layers(block)]


def profile(model: nn.Module) -> list[LayerProfile]:
    """Every compressible weight of the model with its kind and shape, in walk order."""
    ad = adapter_for(model)
    return [LayerProfile(f"{ad.block_name(i)}.{layer.name}", layer.kind, layer.shape, i)
            for i, block in enumerate(ad.blocks(model)) for layer in ad.layers(block)]


def dense_report(model: nn.Module) -> CompressionReport:
    """The report of a model left as it is: each compressible layer at its stored dtype."""
    report = CompressionReport()
    for name, layer in _block_layers(model):
        w = layer.weight
        nbytes = w.numel() * w.element_size()
        report.layers.append({"name": name, "kind": layer.kind, "out": w.shape[0],
                              "in": w.shape[1], "params": w.numel(), "bytes": nbytes,
                              "bits_per_param": 8.0 * w.element_size(), "sparsity": 0.0,
                              "rank": 0, "bits": 8 * w.element_size(), "rel_error": 0.0})
    return report


@torch.no_grad()
def profile_pass(model: nn.Module, profiles: list[LayerProfile], windows: torch.Tensor,
                 batch_size: int, needs: frozenset[str]) -> None:
    """Fill profiles[i].extra with the dense weight and (if needed) calibration statistics.

    One forward of the uncompressed model over the calibration windows, hooks on every layer:
    the model-wide facts that global policies (OWL, sensitivity) compare across layers before
    any layer is changed.
    """
    named = _block_layers(model)
    for (_, layer), p in zip(named, profiles):
        p.extra["weight"] = layer.weight.detach()
    if not needs & {"act_norm", "hessian"}:
        return
    # Layers of different blocks share short names: key stats by the full name.
    full = [Layer(p.name, layer.kind, layer.module, layer.expert, layer.proj)
            for (_, layer), p in zip(named, profiles)]
    stats = {x.name: LayerStats(x.shape[1], "hessian" in needs, x.weight.device) for x in full}
    dev = _device_of(model)
    with collect_stats(adapter_for(model), full, stats):
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
    ad = adapter_for(model)
    first = ad.blocks(model)[0]
    home = _device_of(model)
    device = device or home
    pre = [m for _, m in ad.pre_blocks(model)]
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


def _make_layer(methods: list[Method], state: LayerState, dtype: torch.dtype) -> nn.Module:
    """The packed layer for a finished state: a method's own format if it has one (e.g. a
    bitsandbytes baseline), else the lab's CompressedLinear."""
    for method in methods:
        layer = method.make_layer(state, dtype)
        if layer is not None:
            return layer
    return CompressedLinear.pack(state, dtype)


def _fallback_stats(ad: DecoderAdapter, layer: Layer, moe_inputs: list[torch.Tensor],
                    hessian: bool) -> LayerStats:
    """Statistics of an expert from every token that entered its MoE layer (not only its own)."""
    st = LayerStats(layer.shape[1], hessian, layer.weight.device)
    for x in moe_inputs:
        st.add_batch(x if layer.proj == "gate_up_proj"
                     else ad.expert_intermediate(layer.module, layer.expert, x))
    return st


def store_dtype_for(model: nn.Module) -> torch.dtype:
    """16-bit parts keep the model's dtype when it is 16-bit, else fp16."""
    dt = next(model.parameters()).dtype
    return dt if dt in (torch.float16, torch.bfloat16) else torch.float16


@torch.no_grad()
def compress_model(model: nn.Module, windows: torch.Tensor, methods: list[Method],
                   batch_size: int = 1, progress: bool = True,
                   min_expert_tokens: int = 16,
                   device: str | torch.device | None = None) -> CompressionReport:
    """Compress `model` in place with `methods` (in order), calibrating on `windows` (n, seqlen).

    Routed experts calibrate on the tokens their router sends them. An expert that received fewer
    than `min_expert_tokens` tokens falls back to statistics from every token entering its MoE
    layer (its weights still define the down projection's inputs); the report marks it
    (`fallback`) and records each expert's own token count (`calib_tokens`).
    `device`: where blocks are compressed. If it differs from where the model lives (e.g. the
    model on CPU, device="cuda"), the walk is layer-by-layer: one block at a time moves to
    `device` with the calibration activations and goes back compressed, so the working memory
    on `device` is about one block plus activations, not the model.
    Returns the per-layer report; layers become packed layers / CompressedExperts.
    """
    t0 = time.perf_counter()
    ad = adapter_for(model)
    profiles = profile(model)
    for method in methods:  # shape errors now, not after calibrating half the model
        method.check_shapes(profiles)
    report = CompressionReport()
    needs = frozenset().union(*(m.policy_needs() for m in methods))
    if needs:
        profile_pass(model, profiles, windows, batch_size, needs)
    for method in methods:
        report.allocations[method.stage] = method.allocate(profiles)
    for p in profiles:
        p.extra.clear()  # release the profile statistics before the walk
    want_hessian = any("hessian" in m.needs for m in methods)
    store_dtype = store_dtype_for(model)

    home = _device_of(model)
    dev = torch.device(device) if device is not None else home
    inputs = capture_block_inputs(model, windows, batch_size, dev)
    blocks = ad.blocks(model)
    bar = tqdm(range(len(blocks)), desc="compress", unit="block", disable=not progress)
    for i in bar:
        block = blocks[i].to(dev)
        layers = ad.layers(block)
        stats = {x.name: LayerStats(x.shape[1], want_hessian, dev) for x in layers}
        moe_inputs: dict = {}
        with collect_stats(ad, layers, stats, moe_inputs):
            _run_block(block, inputs)
        packed = {}
        for x in layers:
            full = f"{ad.block_name(i)}.{x.name}"
            st = stats[x.name]
            fallback = x.expert is not None and st.tokens < min_expert_tokens
            if fallback:
                st = _fallback_stats(ad, x, moe_inputs[x.module], want_hessian)
            state = LayerState.from_linear(x.weight, x.bias, name=full)
            for method in methods:
                budget = report.allocations[method.stage][full]
                if budget is not None:  # None: `<stage>.layers` leaves this layer out
                    method.apply(state, st, budget)
            layer = _make_layer(methods, state, store_dtype).to(dev)
            report.layers.append({
                "name": full, "kind": x.kind, "out": x.shape[0], "in": x.shape[1],
                "params": layer.params, "bytes": layer.nbytes(),
                "bits_per_param": 8 * layer.nbytes() / layer.params,
                "sparsity": state.info.get("sparsity", 0.0), "rank": state.info.get("rank", 0),
                "bits": state.info.get("bits", 16),
                "rel_error": relative_error(state.weight, layer.dequantized_weight(), st),
                "calib_tokens": stats[x.name].tokens, "fallback": fallback,
            })
            packed[x.name] = (x, layer)
            del state
        ad.install(block, packed)
        del stats, moe_inputs, packed
        # Feed the next block with what the compressed block really outputs.
        outs = _run_block(block, inputs)
        inputs = [(o, kw) for o, (_, kw) in zip(outs, inputs)]
        block.to(home)
    report.seconds = time.perf_counter() - t0
    return report
