"""Per-point table of a study (any sweeps under one directory): bits/param, perplexity, acc/mean,
compression and tuning time, tuning's own loss ratio, decode speed and serving memory (peak of a
fresh process that loads the saved model and runs the evaluation windows, `mem/serve_peak_bytes`), one row a point, labelled by the
study's point and the overrides that start with one of `--knobs`.

    python -m ciuic_lab.run -m +experiment=tuning model=deepseek-v3-tiny eval.seqlen=512 \\
        eval.max_windows=64 eval.lm_eval.limit=100 tune=none hydra.sweep.dir=DIR/none
    python -m ciuic_lab.run -m +experiment=tuning model=deepseek-v3-tiny eval.seqlen=512 \\
        eval.max_windows=64 eval.lm_eval.limit=100 tune=block tune.iters=50 tune.lr=0.005 \\
        hydra.sweep.dir=DIR/block50
    python benchmarks/sweep_table.py DIR --out benchmarks/results/tuning_<model>.md
    python -m ciuic_lab.run -m +experiment=serving hydra.sweep.dir=DIR
    python benchmarks/sweep_table.py DIR --knobs quant. --out benchmarks/results/serving_<model>.md

Reads every result.json below DIR (the source of truth); prints the table and writes it to --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def rows(root: Path, knobs: tuple[str, ...] = ("tune", "rotate=")) -> list[dict]:
    out = []
    for path in sorted(root.rglob("result.json")):
        r = json.loads(path.read_text())
        if r.get("status") != "ok":
            continue
        m, ov = r["metrics"], r.get("overrides", [])
        point = next((o.split("=", 1)[1] for o in ov if o.startswith("+experiment/")), "-")
        label = " ".join(o for o in ov if o.startswith(knobs)) or "-"
        out.append({"point": point, "knobs": label,
                    "bpp": m.get("size/bits_per_param"), "ppl": m.get("ppl/wikitext2"),
                    "dense": m.get("ppl/wikitext2_dense"), "acc": m.get("acc/mean"),
                    "compress_s": m.get("time/compress_s"), "tune_s": m.get("time/tune_s"),
                    "ratio": m.get("tune/loss_ratio"), "model": r["config"]["model"]["name_or_path"],
                    "decode": _ratio(m.get("speed/decode_tokens_per_s"),
                                     m.get("speed/decode_tokens_per_s_dense")),
                    "kernels": _kernels(r.get("layers", [])),
                    "serve": _mib(m.get("mem/serve_peak_bytes")),
                    "serve_dense": _mib(m.get("mem/serve_peak_bytes_dense"))})
    return sorted(out, key=lambda x: (x["point"], x["knobs"]))


def _ratio(a, b):
    return None if a is None or not b else a / b


def _mib(b):
    return None if b is None else b / 2**20


def _kernels(layers: list[dict]) -> str | None:
    """Layers on a fused kernel (int4 / int8) out of all, as served in the run."""
    names = [row.get("kernel") for row in layers if row.get("kernel")]
    if not names:
        return None
    return f"{sum(k.startswith(('int4', 'int8')) for k in names)}/{len(names)}"


def fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--knobs", nargs="+", default=["tune", "rotate="],
                    help="override prefixes that label a point")
    a = ap.parse_args()
    table = rows(a.root, tuple(a.knobs))
    lines = ["| point | overrides | bits/param | ppl | dense ppl | acc/mean | compress s | tune s | "
             "tune loss after/before | decode vs dense | layers on int4/int8 | serving MiB (dense) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for x in table:
        lines.append(f"| {x['point']} | {x['knobs']} | {fmt(x['bpp'], '.3f')} | "
                     f"{fmt(x['ppl'], '.2f')} | {fmt(x['dense'], '.2f')} | {fmt(x['acc'], '.3f')} "
                     f"| {fmt(x['compress_s'], '.0f')} | {fmt(x['tune_s'], '.0f')} | "
                     f"{fmt(x['ratio'], '.3f')} | {fmt(x['decode'], '.2f')} | "
                     f"{x['kernels'] or ''} | {fmt(x['serve'], '.0f')}"
                     + (f" ({x['serve_dense']:.0f})" if x["serve_dense"] is not None else "") + " |")
    model = table[0]["model"] if table else "?"
    text = "\n".join([f"Written by `python benchmarks/sweep_table.py {a.root} --knobs "
                      f"{' '.join(a.knobs)}` ({model}; times "
                      "on 2 shared CPU cores).", "", *lines, ""])
    print(text)
    if a.out:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
