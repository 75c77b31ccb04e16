"""Export a compressed model as a Hugging Face directory in compressed-tensors' `pack-quantized`
format, which `AutoModelForCausalLM.from_pretrained(dir)` loads through transformers'
compressed-tensors integration (and vLLM is meant to read: untested here, see "vLLM"), with the
residual low-rank factors as a PEFT LoRA adapter: the whole `ciuic` recipe (prune -> quant ->
residual low-rank) leaves the lab.

    python -m ciuic_lab.export RUN_DIR --format compressed-tensors OUT
    export_model(model, tokenizer, out_dir)      # from a live model holding CompressedLinear
    export_run(run_dir, out)                     # from a run's packed checkpoint (save=true)
    exported_size(model, out_dir)                # bytes and bits/param of what was written

What is written (OUT/, which must be new or empty):
    config.json             the model's config + `quantization_config` (quant_method
                            "compressed-tensors", format "pack-quantized", status "compressed")
    model*.safetensors      (+ model.safetensors.index.json when over `shard_bytes`)
    tokenizer files, generation_config.json
    adapter/                only when some quantised layer has a low-rank part:
        adapter_config.json         peft_type LORA, per-target rank_pattern and alpha_pattern
                                    (alpha = r: scaling 1), base_model_name_or_path OUT
        adapter_model.safetensors   lora_A = V (r, in), lora_B = U (out, r) in the export dtype
                                    (8-bit factors dequantised), under PEFT's key names

Loading it (tested, tests/test_export.py; PEFT 0.21.2):
    base = AutoModelForCausalLM.from_pretrained(OUT)
    base.hf_quantizer.compressor.decompress_model(base)
    model = PeftModel.from_pretrained(base, OUT + "/adapter")
The middle line is needed: compressed-tensors builds the dense `weight` only on the first forward,
and PEFT reads `weight` when it wraps a layer (plain from_pretrained + PeftModel fails with
"'Linear' object has no attribute 'weight'"); a forward pass before PeftModel works too.

How one quantised layer maps (our W = (q − z)·s with q, z in [0, 2^k − 1]):
    weight_packed  int32 (out, ceil(in·k/32)): each row's codes as one little-endian bit stream
                   (code j at bits j·k .. j·k+k−1 of the row), zero-padded to whole words. That is
                   our `packing.pack_bits` stream of the row for every k in 2..8 (codes straddle
                   words for 3, 5, 6, 7 bits), so with `in` a multiple of 32 our stored `codes`
                   buffer is weight_packed byte for byte. compressed-tensors reads a stored value
                   as q − 2^(k−1) (its signed code): the stored bits are our codes as they are.
    weight_scale   (out, G) in the export dtype (the model's by default; compressed-tensors builds
                   the scale parameter in the model's dtype and transformers casts to it);
                   G = in / group_size, or 1 per channel (strategy "channel")
    weight_shape   int64 [out, in]; needed, as the packed width does not give `in` unless k | 32
    weight_zero_point  (asymmetric only) int32 (ceil(out·k/32), G): zero points packed the same
                   way down each column (along the output dim); stored z, read as z − 2^(k−1)
    bias           as is
Pruned entries of quantised layers are written as their group's zero code, so they dequantise to
exactly 0. A group as wide as the row or wider (g ≥ in) is the per-channel grid exactly.

Config groups: one per (bits, group size, symmetry) present. group_0 targets the class "Linear"
with the routed experts' scheme (else the most common one); every other scheme names its layers
exactly. Layers without a quantised part (pruned only, or left 16-bit) are written dense
(`weight`, any low-rank part merged into it) and listed in `ignore`, with the head, the routers
and any other linear left uncompressed.

Routed experts (DeepSeek-V3; transformers 5 fuses them into `gate_up_proj` (E, 2I, H) and
`down_proj` (E, H, I)): written per expert, on one grid, since transformers decodes every routed
expert with one config group. Experts on several symmetric grids (the recipe's sensitivity policy
gives each its own width) are written exactly on the widest width and finest group among them
(`regrid`), with an ExportWarning: the export then stores more than the run counted. Their low-rank
parts go through PEFT's `target_parameters` (LoRA on the fused nn.Parameter: one rank per
parameter, lower expert ranks zero-padded, exact).

The adapter's low-rank targets: each quantised linear as a module (`target_modules`), except, in a
MoE model, the dense and shared-expert MLP projections (gate_proj, up_proj, down_proj): PEFT 0.21
on transformers 5 rewrites such module targets into the routed experts' fused parameters (as for
an adapter trained on transformers 4; huggingface/peft#3711), so they are targeted as their
`weight` parameter, which computes the same. PEFT 0.21 then warns that their rank_pattern keys
"did not match any targeted module"; its check ignores parameter targets, and it applies them.

Refused (ExportError, naming the layer and the setting that exports):
    a group size leaving a narrower tail group: compressed-tensors' decompressor raises unless
    in % g == 0 (and vLLM's kernels need it too)                 -> quant.group_size dividing in
    routed experts asymmetric, or dense (transformers decodes routed experts from weight_packed
    only, without zero points)             -> quant.sym=true, no mlp.experts:null in quant.layers
    layers of another packed format (bitsandbytes baselines), or nothing quantised at all

What loads (tested, tests/test_export.py: transformers 5.24-5.25 + compressed-tensors 0.20.1, PEFT
0.21.2 for the adapter, CPU):
    - symmetric, 2..8 bits, groups or per channel, mixed widths/groups in one model, pruned +
      quantised, dense ignored layers, Llama / Qwen2 / DeepSeek-V2 / DeepSeek-V3, tied
      embeddings, sharded: plain from_pretrained(dir); logits equal the packed model's.
      Linear layers load packed and the first forward decompresses the whole model to dense
      weights (a forward pre-hook; no packed kernels on CPU). Routed experts are decompressed at
      load: transformers' DeepSeek (qwen2_moe) conversion collects `experts.{e}.{gate,up,down}
      _proj.weight_packed/_scale/_shape`, dequantises each expert and merges them into the fused
      `gate_up_proj` (E, 2I, H; gate rows first) and `down_proj` (E, H, I).
    - the default recipe (pruned + quantised + residual low-rank, 8-bit factors) on the bundled
      DeepSeek-V3 and on Llama / Qwen2 shapes: the three lines above; logits within 1e-3 (fp32).
    - from_pretrained(dir, quantization_config=CompressedTensorsConfig(dequantize=True))
      decodes every non-expert layer with one config group (transformers' get_dense_scheme):
      with mixed widths it fails or gives wrong weights. Use the default path.
    - asymmetric: only with dequantize=True (so one grid for the whole model) and no routed
      experts. The default path builds unpacked (out, G) int8 zero-point parameters (compressed-
      tensors' meta compression does not pack them) and rejects the packed ones with a size
      mismatch, while its decompressor accepts only packed int32 ones. Exported anyway (it is the
      format compressed-tensors itself writes and vLLM reads), with an ExportWarning.

vLLM (untested: it cannot run here). Its compressed-tensors W{k}A16 path reads exactly these
tensor names. From what is known of it, not verified here: its kernels take 4 and 8 bits (other
widths are refused), group sizes -1/32/64/128; it fuses q/k/v, gate/up, DeepSeek's q_a_proj +
kv_a_proj_with_mqa and each layer's experts, whose parts must then share one scheme. Older
compressed-tensors releases packed floor(32/k) codes per int32 without straddling, which differs
from this layout for 3, 5, 6 and 7 bits (2, 4, 8 are the same either way).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ciuic_lab.compress.state import QuantPart
from ciuic_lab.compress.store import packing
from ciuic_lab.compress.store.experts import CompressedExperts
from ciuic_lab.compress.store.linear import CompressedLinear
from ciuic_lab.errors import CheckpointError
from ciuic_lab.models.adapters import adapter_for

FORMATS = ("compressed-tensors",)
SHARD_BYTES = 5 * 2**30


class ExportError(ValueError):
    pass


class ExportWarning(UserWarning):
    """The export is written but a loader is known to need care with it."""


@dataclass(frozen=True)
class Scheme:
    """One config group's weight arguments: k bits, group size (-1: per output channel), sym."""

    bits: int
    group_size: int
    sym: bool

    def weights_args(self) -> dict:
        return {"num_bits": self.bits, "type": "int", "symmetric": self.sym,
                "strategy": "channel" if self.group_size == -1 else "group",
                "group_size": None if self.group_size == -1 else self.group_size,
                "dynamic": False, "actorder": None, "block_structure": None,
                "observer": "minmax", "observer_kwargs": {}}


# ---- one layer ------------------------------------------------------------------------------


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, cols) integer codes in [0, 2^k) -> (rows, ceil(cols·k/32)) int32, each row one
    little-endian bit stream: compressed-tensors' `weight_packed` layout.

    Padding every row to a multiple of 32 codes makes each row's stream a whole number of int32
    words (32 codes of k bits = k words), so one flat `pack_bits` packs all rows at once; the
    words past ceil(cols·k/32) hold only padding and are dropped.
    """
    if sys.byteorder != "little":  # the int32 view below reads the bytes in host order
        raise ExportError("export writes little-endian int32 words; this host is big-endian")
    rows, cols = codes.shape
    padded = torch.nn.functional.pad(codes.to(torch.int32), (0, (-cols) % 32))
    stream = packing.pack_bits(padded.reshape(-1), bits)
    words = stream.view(rows, -1).view(torch.int32)
    return words[:, :math.ceil(cols * bits / 32)].contiguous()


def layer_scheme(name: str, lin: CompressedLinear) -> Scheme | None:
    """The scheme `lin`'s base part exports under, None if it has no quantised part (exported
    dense, low-rank part merged). A low-rank part of a quantised layer goes to the adapter.

    Raises ExportError for what pack-quantized cannot express.
    """
    base = lin.meta["base"]
    if base is None or base["quant"] is None:
        return None
    q = base["quant"]
    g, cols = q["group_size"], lin.in_features
    if g > cols:
        # One (narrower) group spanning the whole row is the per-channel grid, exactly.
        g = -1
    elif cols % g:
        raise ExportError(
            f"{name}: group size {g} does not divide its input dim {cols}, so its last group is "
            f"narrower ({cols % g} columns); compressed-tensors requires the group size to divide "
            f"the input dim. Export a run quantised with a group size that divides every input "
            f"dim (quant.group_size, e.g. {math.gcd(g, cols)} here, or -1 per channel)")
    return Scheme(q["bits"], g, q["sym"])


def _group_cols(scheme: Scheme, cols: int) -> int:
    return cols if scheme.group_size == -1 else scheme.group_size


def regrid(qp: QuantPart, own: Scheme, to: Scheme, cols: int) -> QuantPart:
    """The same dequantised values on a wider and/or finer symmetric grid, exactly.

    A symmetric k-bit code q means (q − 2^(k−1))·s, so q + 2^(K−1) − 2^(k−1) is the same value
    on the K-bit grid with the same scale; a group of g columns is g/g' groups of g' columns
    sharing its scale. Used to put every routed expert on the one grid transformers decodes them
    with; it costs the wider codes and the repeated scales, and loses nothing.
    """
    g_own, g_to = _group_cols(own, cols), _group_cols(to, cols)
    if not (own.sym and to.sym and to.bits >= own.bits and g_own % g_to == 0):
        raise ExportError(f"cannot put {_describe(own)} exactly on {_describe(to)}")  # a bug
    codes = qp.codes + (2 ** (to.bits - 1) - 2 ** (own.bits - 1))
    scale = qp.scale.repeat_interleave(g_own // g_to, dim=1)
    zero = torch.full_like(scale, float(2 ** (to.bits - 1)))
    return QuantPart(codes, scale, zero, to.bits, to.group_size, True)


def quantised_tensors(lin: CompressedLinear, scheme: Scheme, dtype: torch.dtype,
                      rows: slice | None = None) -> dict[str, torch.Tensor]:
    """pack-quantized tensors (local names) of `lin` on `scheme` (its own, or a wider / finer
    symmetric one it fits exactly), optionally only the output rows `rows`."""
    qp = lin.dense_codes()  # pruned entries at the zero code: they dequantise to exactly 0
    own = layer_scheme("", lin)
    if own != scheme:
        qp = regrid(qp, own, scheme, lin.in_features)
    codes, scale, zero = qp.codes, qp.scale, qp.zero
    if rows is not None:
        codes, scale, zero = codes[rows], scale[rows], zero[rows]
    out, cols = codes.shape
    if scale.shape[1] != (1 if scheme.group_size == -1 else cols // scheme.group_size):
        raise ExportError(f"scale shape {tuple(scale.shape)} does not fit {scheme}")  # a bug
    t = {"weight_packed": pack_rows(codes, scheme.bits),
         "weight_scale": scale.to(dtype),
         "weight_shape": torch.tensor([out, cols], dtype=torch.int64)}
    if not scheme.sym:
        # compressed-tensors packs zero points down the output dim: transpose, pack, transpose.
        zp = zero.round().to(torch.int32)
        t["weight_zero_point"] = pack_rows(zp.t(), scheme.bits).t().contiguous()
    return t


def dense_weight(lin: CompressedLinear, dtype: torch.dtype) -> torch.Tensor:
    return lin.dequantized_weight(torch.float32).to(dtype)


# ---- the model ------------------------------------------------------------------------------


def _dense_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


@dataclass(frozen=True)
class _Lora:
    """One target of the adapter: a quantised linear, or a fused routed-experts parameter."""

    name: str  # the linear, or the experts module (transformers' fused one)
    param: str | None  # None: a module target; else a parameter target: "weight" of a linear,
    # one of the adapter's `expert_projs` ("gate_up_proj" / "down_proj") of an experts module
    rank: int  # for a fused parameter, its largest expert rank (the others are zero-padded)
    prefix: str  # where PEFT keeps its lora_A / lora_B in the adapter's state dict

    @property
    def key(self) -> str:
        return self.name if self.param is None else f"{self.name}.{self.param}"


@dataclass
class _Plan:
    """What the export writes, decided (and every refusal raised) before anything is written."""

    linears: dict[str, tuple[CompressedLinear, Scheme | None]]
    experts: dict[str, CompressedExperts]
    expert_scheme: Scheme | None
    dense_keys: list[str]  # the rest of the state dict, tied aliases left out
    config_groups: dict
    ignore: list[str]
    lora: list[_Lora]


def export_model(model: nn.Module, tokenizer, out_dir: str | Path, *,
                 dtype: torch.dtype | None = None, shard_bytes: int = SHARD_BYTES) -> Path:
    """Write `model` (holding CompressedLinear / CompressedExperts) to `out_dir` as a
    compressed-tensors pack-quantized checkpoint. Returns `out_dir`.

    dtype: of scales, dense layers and the rest of the model (embeddings, norms, head);
    default the model's. Our scales are fp16 values: float16 or float32 keep them exact,
    bfloat16 rounds them to 8 significant bits (what a bf16 runtime would do anyway).
    Tensors are produced layer by layer and written a shard at a time, so the export needs
    about one shard of memory on top of the model.
    """
    out_dir = Path(out_dir)
    _check_out(out_dir)
    dtype = dtype or _dense_dtype(model)
    plan = _plan(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_weights(_tensors(model, plan, dtype), out_dir, shard_bytes)
    if plan.lora:
        write_adapter(model, plan.lora, out_dir, dtype)
    qconfig = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": plan.config_groups,
        "ignore": plan.ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": _ct_version(),
    }
    config = copy.deepcopy(model.config)
    if not getattr(config, "architectures", None):
        config.architectures = [type(model).__name__]  # vLLM picks the model class from it
    config.dtype = dtype
    config.save_pretrained(str(out_dir))
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"] = qconfig
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(str(out_dir))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    return out_dir


def _plan(model: nn.Module) -> _Plan:
    routers = adapter_for(model).router_names
    experts: dict[str, CompressedExperts] = {}
    linears: dict[str, tuple[CompressedLinear, Scheme | None]] = {}
    ignore: list[str] = []
    groups: dict[Scheme, list[str]] = {}
    for name, mod in model.named_modules():
        if any(name.startswith(p + ".") for p in experts):
            continue
        if isinstance(mod, CompressedExperts):
            experts[name] = mod
        elif isinstance(mod, CompressedLinear):
            scheme = layer_scheme(name, mod)
            linears[name] = (mod, scheme)
            if scheme is None:
                ignore.append(name)  # written dense
            else:
                groups.setdefault(scheme, []).append(name)
        elif type(mod).__module__.startswith("ciuic_lab.compress"):
            raise ExportError(f"{name} is a {type(mod).__name__}, a format pack-quantized cannot "
                              f"hold (bitsandbytes baselines export only through bitsandbytes)")
        elif isinstance(mod, nn.Linear) or name.rpartition(".")[2] in routers:
            # The head, routers and any linear left uncompressed stay dense. The "Linear" target
            # would claim them, so they are ignored by name (loaders such as vLLM also want
            # every linear targeted or ignored). Routers are not nn.Linear in transformers but
            # are linears in vLLM.
            ignore.append(name)
    expert_scheme = _experts_scheme(experts)
    if not groups and expert_scheme is None:
        raise ExportError("nothing to export quantised: no layer of the model has a quantised "
                          "part (export a run with a quant stage, e.g. quant=rtn)")
    config_groups = _config_groups(groups, expert_scheme)
    _warn_asymmetric(config_groups)
    skip = tuple(p + "." for p in (*linears, *experts))
    dense = {k: v for k, v in model.state_dict().items() if not k.startswith(skip)}
    tied = _tied_keys(model, dense)
    return _Plan(linears, experts, expert_scheme, [k for k in dense if k not in tied],
                 config_groups, ignore, _lora_targets(linears, experts))


def _tensors(model: nn.Module, plan: _Plan, dtype: torch.dtype):
    """(key, tensor) for everything the checkpoint holds, one layer at a time."""
    for name, (lin, scheme) in plan.linears.items():
        if scheme is None:
            yield f"{name}.weight", dense_weight(lin, dtype)
        else:
            for k, v in quantised_tensors(lin, scheme, dtype).items():
                yield f"{name}.{k}", v
        if lin.meta["bias"]:
            yield f"{name}.bias", lin.bias.to(dtype)
    for owner, mod in plan.experts.items():
        # Per expert, as DeepSeek checkpoints store them; transformers merges them into its
        # fused parameters on load.
        ad = mod.adapter
        for e in range(mod.num_experts):
            expert = getattr(mod, str(e))
            gate_up_rows = getattr(expert, ad.expert_projs[0]).out_features
            for name, proj, rows in ad.expert_parts(owner, e, gate_up_rows):
                lin = getattr(expert, proj)
                for k, v in quantised_tensors(lin, plan.expert_scheme, dtype, rows).items():
                    yield f"{name}.{k}", v
    model_dtype = _dense_dtype(model)
    state = model.state_dict()
    for k in plan.dense_keys:
        v = state[k]
        # Tensors the model keeps in another dtype on purpose (e.g. an fp32 router bias in a
        # bf16 model) stay as they are; the rest follows `dtype`.
        if v.is_floating_point() and v.dtype == model_dtype:
            v = v.to(dtype)
        yield k, v.detach().cpu().contiguous()


def _check_out(out_dir: Path) -> None:
    # Files of an earlier export (other shards, an index) would be read along with ours.
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"{out_dir} exists and is not an empty directory; export into a new one")


def _config_groups(groups: dict[Scheme, list[str]], expert_scheme: Scheme | None) -> dict:
    """config_groups: group_0 targets the class "Linear", every other scheme its layers by exact
    name (compressed-tensors resolves exact name > regex > class, so named layers win).

    group_0 holds the routed experts' scheme when there are experts: transformers 5.24 decodes
    routed experts with the first group whose `re:` targets name experts, else with the *first*
    group having a non-regex target (exact names count), so it must come first; an exact name
    could not serve, since the fused experts module it builds has no per-expert linears. Without
    experts group_0 is the most common scheme (fewest names). A model on one grid gets the
    one-group config that quantisation tools write.
    compressed-tensors 0.20.1 logs "Could not match `<name>`" for each named target on load:
    it tries "Linear" first and stops there, yet gives the module the named group's scheme.
    """
    main = expert_scheme
    if main is None:
        main = max(groups, key=lambda s: len(groups[s]))
    out = {"group_0": _group(main, ["Linear"])}
    for scheme, names in groups.items():
        if scheme != main:
            out[f"group_{len(out)}"] = _group(scheme, names)
    return out


def _group(scheme: Scheme, targets: list[str]) -> dict:
    return {"targets": targets, "weights": scheme.weights_args(), "input_activations": None,
            "output_activations": None, "format": "pack-quantized"}


def _warn_asymmetric(config_groups: dict) -> None:
    asym = [g for g in config_groups.values() if not g["weights"]["symmetric"]]
    if not asym:
        return
    msg = ("asymmetric layers: transformers 5.24 with compressed-tensors 0.20.1 reads packed zero "
           "points only with from_pretrained(dir, quantization_config=CompressedTensorsConfig("
           "dequantize=True)); its default path expects unpacked zero points (size mismatch)")
    if len(config_groups) > 1:
        msg += (f". This export has {len(config_groups)} config groups, and dequantize=True "
                f"decodes every layer with one of them: transformers cannot load it correctly")
    warnings.warn(msg, ExportWarning, stacklevel=4)  # the caller of export_model


def _experts_scheme(experts: dict[str, CompressedExperts]) -> Scheme | None:
    """The one scheme every routed expert is written on (None if there are none).

    transformers 5.24 decodes all routed experts of a compressed-tensors checkpoint with one
    config group, only from `weight_packed` (dense experts go missing) and without zero points
    (asymmetric experts fail an assertion). Symmetric experts on different grids (the recipe's
    sensitivity policy gives each expert its own width) are written exactly on the widest width
    and the finest group among them (`regrid`), with an ExportWarning for the bytes that costs.
    """
    seen: dict[Scheme | None, str] = {}
    cols: dict[Scheme, set[int]] = {}
    for owner, mod in experts.items():
        for e in range(mod.num_experts):
            expert = getattr(mod, str(e))
            for proj in mod.adapter.expert_projs:
                name, lin = f"{owner}.{e}.{proj}", getattr(expert, proj)
                scheme = layer_scheme(name, lin)
                seen.setdefault(scheme, name)
                if scheme is not None:
                    cols.setdefault(scheme, set()).add(lin.in_features)
    if not seen:
        return None
    if None in seen:
        raise ExportError(
            f"routed expert {seen[None]} is not quantised: transformers loads the routed experts "
            f"of a compressed-tensors checkpoint only from packed codes. Export a run that "
            f"quantises every routed expert (no mlp.experts entry set to null in quant.layers)")
    asym = [n for s, n in seen.items() if not s.sym]
    if asym:
        raise ExportError(
            f"routed experts are quantised asymmetrically ({asym[0]}): transformers decodes routed "
            f"experts without their zero points. Export a run with quant.sym=true")
    if len(seen) == 1:
        return next(iter(seen))
    bits = max(s.bits for s in seen)
    if all(s.group_size == -1 for s in seen):
        group = -1
    else:
        group = math.gcd(*(_group_cols(s, c) for s in seen for c in cols[s]))
    to = Scheme(bits, group, True)
    others = sorted({_describe(s) for s in seen if s != to})
    warnings.warn(
        f"routed experts are on {len(seen)} grids ({'; '.join(others)}); transformers decodes "
        f"them with one config group, so they are written exactly on {_describe(to)}, which "
        f"stores more bytes than the run counted. To export them as quantised, quantise every "
        f"routed expert on one grid (e.g. quant.layers={{mlp.experts:4}})",
        ExportWarning, stacklevel=4)
    return to


def _describe(s: Scheme | None) -> str:
    if s is None:
        return "not quantised"
    g = "per channel" if s.group_size == -1 else f"group {s.group_size}"
    return f"{s.bits} bits, {g}, {'sym' if s.sym else 'asym'}"


def _tied_keys(model: nn.Module, state: dict[str, torch.Tensor]) -> set[str]:
    """Keys that alias an earlier tensor and that the config ties (safetensors stores each
    tensor once; transformers re-ties on load). An alias the config does not declare is an
    error rather than a silently duplicated or dropped tensor."""
    first: dict[tuple, str] = {}
    out = set()
    tie = bool(getattr(model.config, "tie_word_embeddings", False))
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key in first:
            if not tie:
                raise ExportError(f"{k} shares its tensor with {first[key]} but the config does "
                                  f"not tie them (tie_word_embeddings is false)")
            out.add(k)
        else:
            first[key] = k
    return out


def _write_weights(tensors, out_dir: Path, shard_bytes: int) -> None:
    """Write (key, tensor) pairs as safetensors shards of about `shard_bytes`, each as soon as it
    is full. Shards get their final names (model-i-of-n) once n is known; a single one is
    model.safetensors with no index."""
    meta = {"format": "pt"}
    files: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush():
        path = out_dir / f".shard-{len(files):05d}.safetensors"
        save_file(shard, str(path), metadata=meta)
        files.append((path, list(shard)))
        shard.clear()

    for k, v in tensors:
        n = v.numel() * v.element_size()
        if shard and size + n > shard_bytes:
            flush()
            size = 0
        shard[k] = v
        size += n
        total += n
    flush()
    if len(files) == 1:
        files[0][0].rename(out_dir / "model.safetensors")
        return
    weight_map = {}
    for i, (path, keys) in enumerate(files, 1):
        fname = f"model-{i:05d}-of-{len(files):05d}.safetensors"
        path.rename(out_dir / fname)
        weight_map.update({k: fname for k in keys})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _ct_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("compressed-tensors")
    except ImportError:  # PackageNotFoundError: not installed; the file is valid, unlabelled
        return None


# ---- the low-rank part as a PEFT LoRA adapter --------------------------------------------------

ADAPTER_DIR = "adapter"
_PEFT_PREFIX = "base_model.model."  # PeftModel's path to the base model's modules
_PEFT_MOE_REWRITES = ("gate_proj", "up_proj", "down_proj", "w1", "w2", "w3")


def _lora_targets(linears: dict[str, tuple[CompressedLinear, Scheme | None]],
                  experts: dict[str, CompressedExperts]) -> list[_Lora]:
    """The adapter's targets: every quantised linear with a low-rank part (a dense layer carries
    its U·V merged into its weight), and each fused routed-experts parameter some expert of which
    has one (PEFT's `target_parameters`: LoRA on an nn.Parameter, one rank for all experts)."""
    out = []
    for name, (lin, scheme) in linears.items():
        if scheme is None or lin.meta["lowrank"] is None:
            continue
        # PEFT 0.21 on transformers 5 rewrites every target_modules entry ending in
        # gate_proj / up_proj / down_proj of a MoE model (DeepSeek, Qwen2-MoE, Mixtral) into the
        # fused experts' parameters, as if the adapter came from transformers 4, so the dense and
        # shared-expert MLPs would lose their factors (huggingface/peft#3711). Targeting their
        # `weight` as a parameter is not rewritten and computes the same W·x + U·V·x.
        param = "weight" if experts and name.rpartition(".")[2] in _PEFT_MOE_REWRITES else None
        out.append(_Lora(name, param, lin.meta["lowrank"]["rank"], _PEFT_PREFIX + name))
    for owner, mod in experts.items():
        # PEFT targets the fused parameters, which the packed projections are named after.
        ranks = {}
        for proj in mod.adapter.expert_projs:
            parts = [getattr(getattr(mod, str(e)), proj).meta["lowrank"]
                     for e in range(mod.num_experts)]
            ranks[proj] = max((lr["rank"] for lr in parts if lr is not None), default=0)
        targeted = [p for p in mod.adapter.expert_projs if ranks[p]]
        for i, proj in enumerate(targeted):
            # PEFT wraps the parameters of one module one inside the other, in the module's
            # declaration order (expert_projs': gate_up_proj, then down_proj): every later one
            # adds a level.
            nest = ".base_layer" * (len(targeted) - 1 - i)
            out.append(_Lora(owner, proj, ranks[proj], _PEFT_PREFIX + owner + nest))
    return out


def _lora_factors(model: nn.Module, t: _Lora, dtype: torch.dtype) \
        -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A, lora_B) of one target, with scaling 1: A = V (r, in), B = U (out, r).

    For a fused parameter of E experts PEFT reads A (E·r, in) as E blocks of r rows and
    B (out, r·E) as (out, r, E): expert e's factors are A[e·r:(e+1)·r] and B[:, :, e]. Experts
    of a lower rank (or none) are zero-padded to r, which leaves their product unchanged.
    """
    mod = model.get_submodule(t.name)
    if isinstance(mod, CompressedLinear):
        u, v = mod.lowrank_factors()
        return v.to(dtype).contiguous(), u.to(dtype).contiguous()
    first = getattr(getattr(mod, "0"), t.param)
    n, r = mod.num_experts, t.rank
    a = torch.zeros(n, r, first.in_features)
    b = torch.zeros(first.out_features, r, n)
    for e in range(n):
        factors = getattr(getattr(mod, str(e)), t.param).lowrank_factors()
        if factors is not None:
            u, v = factors
            a[e, :v.shape[0]] = v
            b[:, :u.shape[1], e] = u
    return a.reshape(n * r, -1).to(dtype), b.reshape(b.shape[0], -1).to(dtype)


def write_adapter(model: nn.Module, targets: list[_Lora], out_dir: Path, dtype: torch.dtype) -> Path:
    """Write the low-rank parts as a PEFT LoRA adapter in `out_dir/adapter`, so that
    `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out_dir), out_dir/adapter)`
    computes base(x) + U·(V·x) for every target, as the lab's model does.

    The residual factors are those of LQER / SVD-LLM (arXiv 2402.02446, 2403.07378), fitted to
    what pruning and quantisation left; LoRA (arXiv 2106.09685) adds B·A·x·alpha/r, so alpha = r
    per target (`alpha_pattern`) makes it U·V exactly. 8-bit factors are dequantised to `dtype`.
    The state dict is built whole (PEFT reads one adapter_model.safetensors): about the low-rank
    parameters times the dtype's bytes.
    """
    adir = out_dir / ADAPTER_DIR
    adir.mkdir()
    tensors = {}
    for t in targets:
        a, b = _lora_factors(model, t, dtype)
        tensors[f"{t.prefix}.lora_A.weight"] = a
        tensors[f"{t.prefix}.lora_B.weight"] = b
    save_file(tensors, str(adir / "adapter_model.safetensors"), metadata={"format": "pt"})
    ranks = [t.rank for t in targets]
    r = max(set(ranks), key=ranks.count)
    # Every target by its exact name. PEFT 0.21 warns that the keys of parameter targets "did
    # not match any targeted module and were ignored": its check looks at module targets only,
    # and it does apply them (the round-trip tests compare logits).
    pattern = {t.key: t.rank for t in targets}
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(out_dir.resolve()),
        "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": [t.name for t in targets if t.param is None] or None,
        "target_parameters": [t.key for t in targets if t.param is not None] or None,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None,
    }
    (adir / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return adir


# ---- size --------------------------------------------------------------------------------------


def exported_size(model: nn.Module, out_dir: str | Path) -> dict:
    """Bytes an export stores for the compressed layers of `model` (packed codes, scales, zero
    points, shapes, biases, dense-written layers, and the whole adapter), and bits per parameter
    over those layers' dense parameters: the run's `size/bits_per_param`, counted on the files.

    Pruned entries are codes like any other here (the format has no mask), and routed experts
    widened to one grid count their wider codes, so this is at least the run's figure for the
    quantised part.
    """
    out_dir = Path(out_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExportWarning)  # export_model has given them
        plan = _plan(model)
    prefixes = tuple(n + "." for n in (*plan.linears, *plan.experts))
    params = sum(m.params for m in model.modules() if isinstance(m, CompressedLinear))
    weights = sum(n for f in sorted(out_dir.glob("model*.safetensors"))
                  for k, n in _tensor_bytes(f).items() if k.startswith(prefixes))
    adapter_file = out_dir / ADAPTER_DIR / "adapter_model.safetensors"
    adapter = sum(_tensor_bytes(adapter_file).values()) if adapter_file.exists() else 0
    total = weights + adapter
    return {"params": params, "bytes": total, "adapter_bytes": adapter,
            "bits_per_param": 8 * total / params}


def _tensor_bytes(path: Path) -> dict[str, int]:
    """Each tensor's stored bytes, from a safetensors header (8-byte length, then JSON)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {k: v["data_offsets"][1] - v["data_offsets"][0]
            for k, v in header.items() if k != "__metadata__"}


# ---- runs and the command line --------------------------------------------------------------


def export_run(run_dir: str | Path, out: str | Path, format: str = "compressed-tensors") -> Path:
    """Export a run's packed checkpoint: `RUN_DIR/compressed` (written with save=true), or
    RUN_DIR itself when it is that checkpoint directory."""
    from transformers import AutoTokenizer

    from ciuic_lab.compress.store import checkpoint

    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; known: {', '.join(FORMATS)}")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir} is not a directory (expected a run's job directory)")
    ckpt = run_dir / "compressed" if (run_dir / "compressed").is_dir() else run_dir
    _check_out(Path(out))  # before loading a large model for nothing
    model = checkpoint.load(ckpt)
    tokenizer = None
    if any((ckpt / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
    else:
        warnings.warn(f"{ckpt} holds no tokenizer; the export will have none", ExportWarning,
                      stacklevel=2)
    return export_model(model, tokenizer, out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ciuic_lab.export",
                                description="Export a run's compressed model to a Hugging Face "
                                            "directory (compressed-tensors pack-quantized).")
    p.add_argument("run_dir", type=Path, help="a run's job directory holding compressed/")
    p.add_argument("out", type=Path, help="the directory to write (new or empty)")
    p.add_argument("--format", default="compressed-tensors", choices=FORMATS)
    args = p.parse_args(argv)
    try:
        path = export_run(args.run_dir, args.out, args.format)
    except (ExportError, CheckpointError) as e:
        print(f"export failed: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
