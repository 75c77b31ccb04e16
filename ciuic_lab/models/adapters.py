"""What the pipeline may compress in each supported architecture.

One rule for every decoder: the blocks are `model.model.layers`; inside a block every nn.Linear
is compressible except routers (`mlp.gate`, the MoE router: compressing it changes which experts
run). Norms and the router's correction bias are not linears, so they are never touched.
Embeddings and the LM head sit outside the blocks and stay dense.
Routed experts of DeepSeek-V2/V3 (fused 3-D parameters in transformers 5) are not nn.Linear and
stay dense here.
"""

from __future__ import annotations

from torch import nn

SUPPORTED = ("deepseek_v3", "deepseek_v2", "llama", "qwen2")
ROUTER_NAMES = ("gate",)  # last path component of MoE routers, e.g. `mlp.gate`


class UnsupportedModel(ValueError):
    pass


def check_supported(config) -> None:
    mt = getattr(config, "model_type", None)
    if mt not in SUPPORTED:
        raise UnsupportedModel(
            f"model_type {mt!r} is not supported; supported architectures: {', '.join(SUPPORTED)}")


def blocks(model: nn.Module) -> nn.ModuleList:
    check_supported(model.config)
    return model.model.layers


def linear_kind(name: str) -> str:
    if "self_attn" in name:
        return "attn"
    if "shared_expert" in name:
        return "shared_expert"
    if "experts" in name:
        return "expert"
    return "mlp"


def compressible_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """{name within block: module} of the linears a stage may compress, in forward order."""
    out = {}
    for name, mod in block.named_modules():
        if isinstance(mod, nn.Linear) and name.split(".")[-1] not in ROUTER_NAMES:
            out[name] = mod
    return out
