"""The architecture boundary: everything the lab knows about how a decoder is laid out.

The pipeline, the checkpoint and the evaluators never name a module path themselves; they ask the
model's adapter:

    blocks(model)            the decoder blocks, walked in order
    block_name(i)            "model.layers.{i}": the prefix of block i's names (reports, files)
    pre_blocks / post_blocks what runs before block 0 (embeddings, rotary tables) and after the
                             last one (final norm, head): loaded once, never compressed
    embeddings / final_norm / head
                             the ends of the model, for transforms that edit them (rotations)
    layers(block)            every compressible weight of a block (a Layer): each nn.Linear except
                             routers, and each projection of each routed expert of a fused experts
                             module, as an (out, in) slice
    install(block, packed, make_experts)
                             swap packed layers in; a fused experts module becomes what
                             make_experts builds from its packed projections (the caller's
                             CompressedExperts: models/ knows layouts, not packed formats)
    expert_projs / expert_intermediate / expert_mlp / expert_parts
                             a routed expert's projections (the fused parameters' names), its
                             MLP (the one written here; every caller runs it), and where its rows
                             go in a per-expert checkpoint
    checkpoint_tensors       how a block's checkpoint tensors (per-expert, official layout) map
                             onto the module's parameters (fused experts)
    residual / no_residual / value_rows(config) / online_sites
                             the rotation layouts (`compress/rotate/` holds the maths only):
                             which paths of a block read and write the residual stream (or why a
                             rotation cannot pass), where each head's value rows are, which
                             linears may get a run-time rotation in front

One adapter class (`DecoderAdapter`) serves every supported architecture, since transformers lays
them out alike: `model.model.{embed_tokens, rotary_emb, layers, norm}` + `lm_head`, routers at
`mlp.gate` (compressing one would change which experts run), and DeepSeek-V2/V3 routed experts as
fused 3-D parameters `gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I). What differs is the
rotation layout (Llama-style attention vs DeepSeek's MLA and MoE, Gemma 3's post-norms), given per
entry. Adding an architecture is one entry in ADAPTERS (a subclass where its layout differs) plus
a tiny config for the tests. Norms, the router's correction bias, embeddings and the head are
never compressed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn

from ciuic_lab.errors import UnsupportedModel


@dataclass
class Layer:
    """One compressible (out, in) weight: a linear, or one projection of one routed expert."""

    name: str  # path below its block, e.g. "mlp.experts.3.down_proj"
    kind: str  # attn | mlp | shared_expert | expert
    module: nn.Module  # the nn.Linear, or the fused experts module holding the slice
    expert: int | None = None
    proj: str | None = None

    @property
    def weight(self) -> torch.Tensor:
        if self.expert is None:
            return self.module.weight
        return getattr(self.module, self.proj)[self.expert]

    @property
    def bias(self) -> torch.Tensor | None:
        return self.module.bias if self.expert is None else None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)


@dataclass(frozen=True)
class ResidualLayout:
    """Which modules of a decoder block touch the residual stream (paths below the block), for the
    fused residual-stream rotation (`compress/rotate/fused.py:rotate_model`; QuaRot, arXiv
    2404.00456 §4.1).

    readers_*: linears reading the output of that sub-layer's RMSNorm (W ← W diag(g) Q);
    writers:   linears whose output is added to the stream (W ← Qᵀ W, b ← Qᵀ b);
    expert_readers / expert_writers: fused 3-D routed-expert parameters (E, out, in) treated the
               same way per expert; `router`: read like a linear but never compressed;
    internal:  everything else a block may hold that has parameters and must NOT be touched
               (MLA's q_a_layernorm and kv_a_layernorm act on latents, not on the stream).
    Paths absent in a given block (dense vs MoE layers, q LoRA or not) are skipped; anything
    with parameters that is in none of these lists makes rotate_model refuse the model.
    """

    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    attn_readers: tuple[str, ...] = ()
    mlp_readers: tuple[str, ...] = ()
    writers: tuple[str, ...] = ()
    expert_readers: tuple[str, ...] = ()
    expert_writers: tuple[str, ...] = ()
    router: tuple[str, ...] = ()
    internal: tuple[str, ...] = ()


LLAMA_RESIDUAL = ResidualLayout(
    attn_readers=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    mlp_readers=("mlp.gate_proj", "mlp.up_proj"),
    writers=("self_attn.o_proj", "mlp.down_proj"))

DEEPSEEK_RESIDUAL = ResidualLayout(
    # q_proj without q LoRA; q_a_proj with it. q_b_proj / kv_b_proj read the (normed) latents.
    attn_readers=("self_attn.q_proj", "self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"),
    mlp_readers=("mlp.gate_proj", "mlp.up_proj",  # the dense first layer(s)
                 "mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj"),
    writers=("self_attn.o_proj", "mlp.down_proj", "mlp.shared_experts.down_proj"),
    expert_readers=("mlp.experts.gate_up_proj",),
    expert_writers=("mlp.experts.down_proj",),
    router=("mlp.gate",),
    internal=("self_attn.q_a_layernorm", "self_attn.kv_a_layernorm", "self_attn.q_b_proj",
              "self_attn.kv_b_proj"))


@dataclass(frozen=True)
class ValueRows:
    """Where each attention head's value rows are in a block, for the fused per-head rotation of
    values and of the output projection's input (`compress/rotate/fused.py:rotate_value_path`)."""

    src: str        # the linear producing the values, below the block
    heads: int      # attention heads (the output projection's input blocks)
    kv_heads: int   # heads of the value source (GQA: fewer)
    stride: int     # rows per head in the value source
    offset: int     # first value row within a head's rows
    width: int      # value rows per head (the rotation's width)
    out: str = "self_attn.o_proj"  # the linear reading the concatenated heads


# How an architecture keeps its values (`DecoderAdapter.value_path`): per KV head in v_proj
# (Llama, Qwen2, Gemma 3, which has no value norm), or MLA's kv_b_proj (each head's rows are
# [k_nope, v]).
VALUE_PATHS = ("v_proj", "kv_b_proj")


class DecoderAdapter:
    router_names = ("gate",)  # last name part of MoE routers, e.g. `mlp.gate`
    # A routed expert's projections: the fused parameters' names, and the names of each expert's
    # packed layers once compressed (`<experts>.<e>.<proj>`); the one reading the MoE input first.
    expert_projs = ("gate_up_proj", "down_proj")
    # Rotation layouts, set per entry of ADAPTERS (None: that rotation is refused, naming
    # `no_residual` when it is known why).
    residual: ResidualLayout | None = None
    no_residual: str | None = None
    value_path: str | None = None  # one of VALUE_PATHS
    # Layers served as a dense weight (compress/store/serve.py), by name suffix: those the model
    # multiplies by every cached position at each decode step. transformers' MLA caches the
    # latent and re-expands it through kv_b_proj on every step (M = context length), where
    # weight-only kernels built for M = 1 cost 10–20× a dense GEMM; vLLM's MLA keeps 16-bit
    # copies of kv_b_proj for the same reason (vllm/v1/attention/backends/mla/common.py,
    # process_weights_after_loading). DeepSeek-V3: 61 × 32768×512, ~2 GB in bf16.
    serve_dense: tuple[str, ...] = ()
    # Linears whose input may be rotated at run time, by site (`rotate.online`); absent paths
    # are skipped. Routed experts' down projections are not linears: never a site.
    online_sites = MappingProxyType({
        "down_proj": ("mlp.down_proj", "mlp.shared_experts.down_proj"),
        "o_proj": ("self_attn.o_proj",)})
    # official per-expert checkpoint names -> (fused parameter, its rows in the fused slice)
    _EXPERT_KEY = re.compile(r"^(?P<owner>.*\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")

    def __init__(self, *, residual: ResidualLayout | None = None, value_path: str | None = None,
                 serve_dense: tuple[str, ...] | None = None):
        if serve_dense is not None:
            self.serve_dense = serve_dense
        if residual is not None:
            self.residual = residual
        if value_path is not None:
            self.value_path = value_path
        if self.value_path not in (None, *VALUE_PATHS):
            raise ValueError(f"value_path must be one of {VALUE_PATHS} or None, "
                             f"got {self.value_path!r}")

    # ---- the walk ----------------------------------------------------------------------------
    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def block_name(self, i: int) -> str:
        return f"model.layers.{i}"

    def pre_blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """(name, module) that run before block 0: the input embeddings and shared rotary tables."""
        out = [("model.embed_tokens", self.embeddings(model))]
        if getattr(model.model, "rotary_emb", None) is not None:
            out.append(("model.rotary_emb", model.model.rotary_emb))
        return out

    def post_blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """(name, module) that run after the last block: final norm, then the LM head."""
        return [("model.norm", self.final_norm(model)), ("lm_head", self.head(model))]

    def embeddings(self, model: nn.Module) -> nn.Module:
        return model.model.embed_tokens

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.model.norm

    def head(self, model: nn.Module) -> nn.Module:
        return model.lm_head

    # ---- what is compressible ----------------------------------------------------------------
    def kind(self, name: str) -> str:
        if "self_attn" in name:
            return "attn"
        if "shared_expert" in name:
            return "shared_expert"
        if "experts" in name:
            return "expert"
        return "mlp"

    # Layers a serving engine fuses into one matmul (they share their input): vLLM's qkv_proj,
    # gate_up_proj and DeepSeek's fused_qkv_a_proj; a layer's routed experts are one FusedMoE.
    SIBLINGS = MappingProxyType({"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj",
                "q_a_proj": "fused_qkv_a_proj", "kv_a_proj_with_mqa": "fused_qkv_a_proj"})

    def sibling_set(self, name: str) -> str:
        """The set a layer (full name) is fused with when served: `…mlp.experts` for every
        routed expert projection of a layer, `…self_attn.qkv_proj` for q/k/v, else itself."""
        parts = name.split(".")
        for i in range(len(parts) - 1):
            if parts[i] == "experts" and parts[i + 1].isdigit():
                return ".".join(parts[:i + 1])
        return ".".join(parts[:-1] + [self.SIBLINGS.get(parts[-1], parts[-1])])

    def is_fused_experts(self, mod: nn.Module) -> bool:
        return all(isinstance(getattr(mod, p, None), nn.Parameter) and getattr(mod, p).dim() == 3
                   for p in self.expert_projs)

    def layers(self, block: nn.Module) -> list[Layer]:
        """Every compressible weight of one decoder block, in module order."""
        out = []
        for name, mod in block.named_modules():
            if isinstance(mod, nn.Linear) and name.split(".")[-1] not in self.router_names:
                out.append(Layer(name, self.kind(name), mod))
            elif self.is_fused_experts(mod):
                for e in range(getattr(mod, self.expert_projs[0]).shape[0]):
                    for proj in self.expert_projs:
                        out.append(Layer(f"{name}.{e}.{proj}", "expert", mod, e, proj))
        return out

    # ---- routed experts ----------------------------------------------------------------------
    # The expert MLP is written here only: the walk runs it on weight slices (calibration, the
    # reference outputs), CompressedExperts on its packed layers.
    def expert_intermediate(self, x: torch.Tensor, gate_up: torch.Tensor | nn.Module,
                            act_fn) -> torch.Tensor:
        """act(x·W_gateᵀ) ⊙ (x·W_upᵀ): the input of a routed expert's down projection, with its
        (2I, H) gate_up weight (gate rows first, as the fused module splits them), or a module
        computing x·W_gate_upᵀ (a packed layer)."""
        gate, up = _linear(x, gate_up).chunk(2, dim=-1)
        return act_fn(gate) * up

    def expert_mlp(self, x: torch.Tensor, gate_up: torch.Tensor | nn.Module,
                   down: torch.Tensor | nn.Module, act_fn) -> torch.Tensor:
        """One routed expert applied to its tokens (weights or packed layers, as above)."""
        return _linear(self.expert_intermediate(x, gate_up, act_fn), down)

    # ---- installing packed layers ------------------------------------------------------------
    def install(self, block: nn.Module, packed: dict[str, tuple[Layer, nn.Module]],
                make_experts: Callable[..., nn.Module]) -> None:
        """Swap each packed layer into the block; a fused experts module whose experts are all
        packed becomes `make_experts(gate_up, down, act_fn, adapter=self)`, the packed
        projections listed by expert (the adapter: their names and the expert MLP)."""
        experts: dict[str, tuple[nn.Module, dict]] = {}
        for name, (layer, mod) in packed.items():
            if layer.expert is None:
                set_submodule(block, name, mod)
            else:
                owner = name.rsplit(".", 2)[0]
                experts.setdefault(owner, (layer.module, {}))[1][(layer.expert, layer.proj)] = mod
        for owner, (orig, parts) in experts.items():
            first, second = self.expert_projs
            n = getattr(orig, first).shape[0]
            set_submodule(block, owner, make_experts(
                [parts[(e, first)] for e in range(n)], [parts[(e, second)] for e in range(n)],
                orig.act_fn, adapter=self))

    # ---- checkpoints -------------------------------------------------------------------------
    def expert_parts(self, owner: str, e: int, gate_up_rows: int) -> list[tuple[str, str, slice]]:
        """Where expert e's fused rows go in a per-expert (official) checkpoint:
        (checkpoint name without `.weight`, fused projection, its rows). The inverse of the
        fusion in `checkpoint_tensors`."""
        half = gate_up_rows // 2
        gate_up, down = self.expert_projs
        return [(f"{owner}.{e}.gate_proj", gate_up, slice(0, half)),
                (f"{owner}.{e}.up_proj", gate_up, slice(half, None)),
                (f"{owner}.{e}.down_proj", down, slice(None))]

    def checkpoint_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A block's tensors as stored in a checkpoint -> the module's state-dict names.

        Official and transformers-saved DeepSeek checkpoints keep routed experts per expert
        (`experts.{j}.gate_proj.weight`, `up_proj`, `down_proj`); the module holds them fused:
        gate_up_proj[j] = cat(gate_j, up_j) (gate rows first, as the module splits them), and
        down_proj[j] = down_j. Other names pass through.
        """
        out, fused = {}, {}
        for key, t in tensors.items():
            m = self._EXPERT_KEY.match(key)
            if m is None:
                out[key] = t
            else:
                fused.setdefault(m["owner"], {})[(int(m["e"]), m["proj"])] = t
        for owner, parts in fused.items():
            n = 1 + max(e for e, _ in parts)
            missing = [f"{owner}.{e}.{p}.weight" for e in range(n)
                       for p in ("gate_proj", "up_proj", "down_proj") if (e, p) not in parts]
            if missing:
                raise KeyError(f"checkpoint lacks expert tensors: {', '.join(missing[:4])}")
            gate_up, down = self.expert_projs
            out[f"{owner}.{gate_up}"] = torch.stack(
                [torch.cat([parts[(e, "gate_proj")], parts[(e, "up_proj")]]) for e in range(n)])
            out[f"{owner}.{down}"] = torch.stack([parts[(e, "down_proj")] for e in range(n)])
        return out

    # ---- rotation layouts --------------------------------------------------------------------
    def value_rows(self, config) -> ValueRows | None:
        """Where each head's value rows are, from the model's config (None: no value path)."""
        heads = config.num_attention_heads
        if self.value_path == "v_proj":
            d = getattr(config, "head_dim", None) or config.hidden_size // heads
            return ValueRows("self_attn.v_proj", heads, config.num_key_value_heads, d, 0, d)
        if self.value_path == "kv_b_proj":
            # MLA: kv_b_proj rows per head are [k_nope (qk_nope_head_dim), v (v_head_dim)]
            d, nope = config.v_head_dim, config.qk_nope_head_dim
            return ValueRows("self_attn.kv_b_proj", heads, heads, nope + d, nope, d)
        return None

    def check(self, config) -> None:
        """UnsupportedModel when this config needs something the adapter does not do."""

    def rebuild_buffers(self, mod: nn.Module, device: torch.device) -> bool:
        """Rebuild `mod`'s non-checkpointed buffers left on the meta device, for a module that has
        no config to be rebuilt from; False when this adapter does not know the module."""
        return False


class Gemma3Adapter(DecoderAdapter):
    """Gemma 3 text (`Gemma3ForCausalLM`): the Llama layout. Its q_norm / k_norm and four norms per
    block are norms, so never compressed; the √hidden embedding scale is inside the embedding
    module (a pre-block), and its sliding-window and global layers' different masks and rotary
    tables reach each block because `capture` asks every block what the model passes it.
    Its values rotate like Llama's (no value norm); its residual stream does not (below)."""

    value_path = "v_proj"
    no_residual = ("Gemma 3 normalises each sub-layer's output (post_attention_layernorm, "
                   "post_feedforward_layernorm) before adding it to the residual stream, and "
                   "scales it by (1 + w) per channel; a rotated stream would need o_proj's and "
                   "down_proj's outputs rotated through those norms, and a per-channel scale "
                   "after a norm neither commutes with a rotation nor folds into any linear")

    def check(self, config) -> None:
        # Walks that finish a forward themselves (streamed evaluation, the Fisher walk) apply
        # post_blocks only: a logit soft-cap after the head would be skipped there.
        if getattr(config, "final_logit_softcapping", None) is not None:
            raise UnsupportedModel("gemma3_text with final_logit_softcapping set: the block walks "
                                   "apply the final norm and head only, not the soft-cap")

    def rebuild_buffers(self, mod: nn.Module, device: torch.device) -> bool:
        # The √hidden scale is a non-persistent buffer, but the module keeps it as a float too.
        scale = getattr(mod, "scalar_embed_scale", None)
        if scale is None:
            return False
        mod.embed_scale = torch.tensor(scale, device=device)
        return True


ADAPTERS: dict[str, DecoderAdapter] = {
    "deepseek_v3": DecoderAdapter(residual=DEEPSEEK_RESIDUAL, value_path="kv_b_proj",
                                  serve_dense=("self_attn.kv_b_proj",)),
    "deepseek_v2": DecoderAdapter(residual=DEEPSEEK_RESIDUAL, value_path="kv_b_proj",
                                  serve_dense=("self_attn.kv_b_proj",)),
    "llama": DecoderAdapter(residual=LLAMA_RESIDUAL, value_path="v_proj"),
    "qwen2": DecoderAdapter(residual=LLAMA_RESIDUAL, value_path="v_proj"),
    "gemma3_text": Gemma3Adapter(),
}
SUPPORTED = tuple(ADAPTERS)


def adapter_for(model_or_config) -> DecoderAdapter:
    """The adapter of a model (or its config); UnsupportedModel lists the supported ones."""
    config = getattr(model_or_config, "config", model_or_config)
    mt = getattr(config, "model_type", None)
    if mt not in ADAPTERS:
        raise UnsupportedModel(
            f"model_type {mt!r} is not supported; supported architectures: {', '.join(SUPPORTED)}")
    ADAPTERS[mt].check(config)
    return ADAPTERS[mt]


def check_supported(config) -> None:
    adapter_for(config)


def _linear(x: torch.Tensor, w: torch.Tensor | nn.Module) -> torch.Tensor:
    """x·Wᵀ for a weight W (cast to x's dtype), or w(x) for a module (a packed layer)."""
    return F.linear(x, w.to(x.dtype)) if isinstance(w, torch.Tensor) else w(x)


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


@contextmanager
def swapped(root: nn.Module, replacements: Mapping[str, nn.Module]) -> Iterator[dict]:
    """Within the block, each submodule of `root` named in `replacements` (dotted paths below
    `root`) is that replacement; the originals are put back on exit, an exception included.
    Yields {name: original}."""
    originals = {name: root.get_submodule(name) for name in replacements}
    try:
        for name, new in replacements.items():
            set_submodule(root, name, new)
        yield originals
    finally:
        for name, mod in originals.items():
            set_submodule(root, name, mod)


@contextmanager
def collect_stats(layers: list[Layer], stats: dict):
    """Hooks that feed `stats[layer.name].add_batch(inputs)` while the caller runs forwards.

    For nn.Linear layers; routed experts are calibrated from their MoE layer's recorded inputs
    and routing (compress/walk/blocks.py), one expert at a time, never by hooks on every expert.
    """
    handles = [layer.module.register_forward_hook(
        lambda _m, args, _o, s=stats[layer.name]: s.add_batch(args[0])) for layer in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
