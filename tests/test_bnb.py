"""bitsandbytes baselines (quant=bnb_nf4 / bnb_int8): real bitsandbytes storage, counted bytes,
outputs that follow the dequantised weights, and clear errors when combined with other stages."""

import json

import pytest
import torch
from test_run import QUICK, _cli

from ciuic_lab.config import build_methods, compose
from ciuic_lab.errors import ConfigError

bnb = pytest.importorskip("bitsandbytes")

from ciuic_lab.compress.quant.bnb import BnbLinear

ALONE = ["recipe=none", "prune=none", "lowrank=none"]


# nf4: 4-bit codes + an fp32 absmax per 64 weights; int8: 8-bit codes + an fp32 scale per row
@pytest.mark.parametrize("scheme,bits", [("nf4", 4 + 32 / 64), ("int8", 8 + 32 / 256)])
def test_bnb_linear_stores_what_bitsandbytes_stores_and_computes_with_it(scheme, bits):
    torch.manual_seed(0)
    w, b, x = torch.randn(96, 256), torch.randn(96), torch.randn(7, 256)
    layer = BnbLinear.quantize(w, b, scheme)
    # plus the 16-entry NF4 table and the bias: nothing dense stays behind
    extra = (16 * 4 if scheme == "nf4" else 0) + 96 * 4
    assert 8 * (layer.nbytes() - extra) / layer.params == pytest.approx(bits)
    assert all(t.numel() < w.numel() or t.dtype in (torch.uint8, torch.int8)
               for t in layer.buffers())
    wq = layer.dequantized_weight()
    err = float((wq - w).norm() / w.norm())
    assert 0 < err < (0.12 if scheme == "nf4" else 0.01)
    if scheme == "nf4":  # every weight is absmax x one of the 16 NF4 levels
        levels = wq[:, :64] / layer.absmax[0::4, None]  # each row's first block of 64
        assert len(torch.unique(levels.round(decimals=4))) <= 16
    ref = torch.nn.functional.linear(x, wq, b)
    for dt in (torch.float32, torch.bfloat16):  # bf16: bitsandbytes' own 16-bit matmul paths
        y = layer(x.to(dt))
        assert y.dtype == dt
        assert float((y.float() - ref).norm() / ref.norm()) < 2e-2, dt


def test_bnb_runs_alone_and_names_what_to_turn_off():
    with pytest.raises(ConfigError, match="prune=none lowrank=none"):
        build_methods(compose(["recipe=none", "quant=bnb_nf4"]))
    with pytest.raises(ConfigError, match="recipe=none"):  # the recipe's quant.bits
        build_methods(compose(["quant=bnb_int8"]))
    with pytest.raises(ConfigError, match="quant.scheme"):
        build_methods(compose([*ALONE, "quant=bnb_nf4", "quant.scheme=fp3"]))
    with pytest.raises(ConfigError, match=r"quant.layers\[down_proj\]: .*only leave layers out"):
        build_methods(compose([*ALONE, "quant=bnb_nf4", "quant.layers={down_proj:4}"]))
    (m,) = build_methods(compose([*ALONE, "quant=bnb_nf4"]))
    assert m.scheme == "nf4" and m.alone


@pytest.mark.parametrize("q,lo,hi", [("bnb_nf4", 4.4, 4.8), ("bnb_int8", 8.0, 8.8)])
def test_cli_baseline_run_measures_real_bytes_with_experts_included(tmp_path, q, lo, hi):
    r = _cli(*QUICK, *ALONE, f"quant={q}", "tracker=none", f"hydra.run.dir={tmp_path}", "save=true",
             "eval.quality_path=packed")  # bitsandbytes' own matmuls, as the reload computes
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "result.json").read_text())
    m = res["metrics"]
    assert res["status"] == "ok"
    assert lo < m["size/bits_per_param"] < hi
    assert m["mem/weight_bytes"] < m["mem/weight_bytes_dense"]
    kinds = {row["kind"] for row in res["layers"]}
    assert {"attn", "mlp", "shared_expert", "expert"} <= kinds
    assert {row["bits"] for row in res["layers"]} == {4 if q == "bnb_nf4" else 8}
    assert m["ppl/wikitext2"] < 1.5 * m["ppl/wikitext2_dense"]
    # the checkpoint holds bitsandbytes' own format and reloads to the same perplexity
    from ciuic_lab.compress.store.checkpoint import load
    from ciuic_lab.data.wikitext import test_windows
    from ciuic_lab.eval.perplexity import perplexity
    from ciuic_lab.models.loader import load_tokenizer

    manifest = json.loads((tmp_path / "compressed" / "compressed.json").read_text())
    assert {spec["format"] for spec in manifest["layers"].values()} == {"bnb"}
    model = load(tmp_path / "compressed")
    assert sum(isinstance(mod, BnbLinear) for mod in model.modules()) == len(res["layers"])
    windows = test_windows(load_tokenizer("tiny-random-deepseek-v3"), 128)[:2]
    assert perplexity(model, windows, batch_size=4, progress=False) == m["ppl/wikitext2"]
