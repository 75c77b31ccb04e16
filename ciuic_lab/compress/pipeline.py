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


def profile(model: nn.Module) -> list[LayerProfile]:
    """Every compressible weight of the model with its kind and shape, in walk order."""
    out = []
    for i, block in enumerate(adapters.blocks(model)):
        for name, lin in adapters.compressible_linears(block).items():
            out.append(LayerProfile(f"model.layers.{i}.{name}", adapters.linear_kind(name),
                                    (lin.out_features, lin.in_features), i))
    return out


@torch.no_grad()
def profile_pass(model: nn.Module, profiles: list[LayerProfile], windows: torch.Tensor,
                 batch_size: int, needs: frozenset[str]) -> None:
    """Fill profiles[i].extra with the dense weight and (if needed) calibration statistics.

    One forward of the uncompressed model over the calibration windows, hooks on every
    compressible linear: the model-wide facts that global policies (OWL, sensitivity) compare
    across layers before any layer is changed.
    """
    mods = {p.name: model.get_submodule(p.name) for p in profiles}
    for p in profiles:
        p.extra["weight"] = mods[p.name].weight.detach()
    if not needs & {"act_norm", "hessian"}:
        return
    stats = {n: LayerStats(m.in_features, "hessian" in needs, m.weight.device)
             for n, m in mods.items()}
    hooks = [m.register_forward_hook(lambda _m, args, _o, s=stats[n]: s.add_batch(args[0]))
             for n, m in mods.items()]
    dev = _device_of(model)
    try:
        for start in range(0, windows.shape[0], batch_size):
            model(input_ids=windows[start:start + batch_size].to(dev), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    for p in profiles:
        p.extra["stats"] = stats[p.name]


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def capture_block_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int) \
        -> list[tuple[torch.Tensor, dict]]:
    """[(hidden_states, kwargs)] entering block 0, one per calibration batch."""
    first = adapters.blocks(model)[0]
    captured: list[tuple[torch.Tensor, dict]] = []

    def grab(_mod, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value",
                                                             "use_cache")}
        captured.append((hidden, kw))
        raise _StopForward

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    dev = _device_of(model)
    try:
        for start in range(0, windows.shape[0], batch_size):
            try:
                model(input_ids=windows[start:start + batch_size].to(dev), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
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


def store_dtype_for(model: nn.Module) -> torch.dtype:
    """16-bit parts keep the model's dtype when it is 16-bit, else fp16."""
    dt = next(model.parameters()).dtype
    return dt if dt in (torch.float16, torch.bfloat16) else torch.float16


@torch.no_grad()
def compress_model(model: nn.Module, windows: torch.Tensor, stages: list[Method],
                   batch_size: int = 1, progress: bool = True) -> CompressionReport:
    """Compress `model` in place with `stages` (in order), calibrating on `windows` (n, seqlen).

    Returns the per-layer report; the model's compressible linears become CompressedLinear.
    """
    t0 = time.perf_counter()
    profiles = profile(model)
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

    inputs = capture_block_inputs(model, windows, batch_size)
    blocks = adapters.blocks(model)
    bar = tqdm(range(len(blocks)), desc="compress", unit="block", disable=not progress)
    for i in bar:
        block = blocks[i]
        linears = adapters.compressible_linears(block)
        dev = _device_of(block)
        stats = {n: LayerStats(lin.in_features, want_hessian, dev) for n, lin in linears.items()}
        hooks = [lin.register_forward_hook(
            lambda _m, args, _o, s=stats[n]: s.add_batch(args[0])) for n, lin in linears.items()]
        try:
            _run_block(block, inputs)
        finally:
            for h in hooks:
                h.remove()
        for name, lin in linears.items():
            full = f"model.layers.{i}.{name}"
            state = LayerState.from_linear(lin.weight, lin.bias)
            for stage in stages:
                stage.apply(state, stats[name], report.allocations[stage.stage][full])
            packed = CompressedLinear.pack(state, store_dtype).to(dev)
            report.layers.append({
                "name": full, "kind": adapters.linear_kind(name),
                "out": lin.out_features, "in": lin.in_features, "params": packed.params,
                "bytes": packed.nbytes(), "bits_per_param": 8 * packed.nbytes() / packed.params,
                "sparsity": state.info.get("sparsity", 0.0), "rank": state.info.get("rank", 0),
                "bits": state.info.get("bits", 16),
                "rel_error": relative_error(state.weight, packed.dequantized_weight(),
                                            stats[name]),
                "calib_tokens": stats[name].tokens,
            })
            _set_submodule(block, name, packed)
            del state
        del stats
        # Feed the next block with what the compressed block really outputs.
        outs = _run_block(block, inputs)
        inputs = [(o, kw) for o, (_, kw) in zip(outs, inputs)]
    report.seconds = time.perf_counter() - t0
    return report
