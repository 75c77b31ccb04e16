"""Where decode time goes: torch.profiler over decode steps only, dense vs RTN 4-bit vs the recipe
(free widths, and with its serving constraints).

    nice python benchmarks/decode_profile.py [--model deepseek-v3-1b] [--layers 3] [--steps 4]
                                             [--by-shape] [--no-serve-dense]

Builds the random 1 B shape of `benchmarks/speed.py` cut to `--layers` blocks (per-block costs do
not depend on depth; compressing the recipe on 3 blocks takes minutes instead of half an hour),
compresses it as speed.py does, prepares kernels, runs a 128-token prefill, then profiles
`--steps` greedy decode steps with the KV cache and prints, per variant, the milliseconds per
token and the top operators by self CPU time (e.g. `_weight_int4pack_mm_for_cpu`: the int4 and
int4x2 layouts; `mm`: the head and the thin low-rank factor matmuls). Writes what it prints to
benchmarks/results/decode_profile_<model>-<layers>l.txt.
"""

from __future__ import annotations

import argparse
import sys
import time

import speed
import torch

from ciuic_lab.compress.store.serve import prepare_for_inference


@torch.no_grad()
def profile_decode(model, steps: int, rows: int, by_shape: bool = False) -> str:
    """Milliseconds per decode token and the profiler's table of the top operators."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, 128), generator=gen)
    out = model(ids, use_cache=True)
    cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)

    def step(n: int) -> None:
        nonlocal cache, nxt
        for _ in range(n):
            o = model(nxt, past_key_values=cache, use_cache=True)
            cache, nxt = o.past_key_values, o.logits[:, -1:].argmax(-1)

    step(2)  # warm-up
    t0 = time.perf_counter()
    step(steps)
    per_token = f"  {(time.perf_counter() - t0) / steps * 1e3:.1f} ms per token"
    with torch.profiler.profile(record_shapes=by_shape) as prof:
        step(steps)
    return per_token + "\n" + prof.key_averages(group_by_input_shape=by_shape).table(
        sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deepseek-v3-1b", choices=sorted(speed.SHAPES))
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-serve-dense", action="store_true",
                    help="no layer held dense (MLA's kv_b_proj on the int4 kernels, as before)")
    ap.add_argument("--by-shape", action="store_true",
                    help="group operators by input shape (e.g. which layer a kernel call is)")
    a = ap.parse_args()
    log: list[str] = []

    def emit(text: str) -> None:  # printed, and kept for the results file
        print(text, flush=True)
        log.append(text)

    torch.set_num_threads(a.threads)
    cls, kw = speed.SHAPES[a.model]
    name = f"{a.model}-{a.layers}l"
    speed.SHAPES[name] = (cls, dict(kw, num_hidden_layers=a.layers))
    model, tok = speed.build(name, "cpu")
    variants = {"rtn-4 g128": ["recipe=none", "prune=none", "lowrank=none", "quant=rtn",
                               "quant.bits=4", "quant.group_size=128"],
                "ciuic": ["data.calib_samples=8", "data.calib_seqlen=256"],
                "ciuic serve": ["data.calib_samples=8", "data.calib_seqlen=256",
                                "quant.kernel_widths=true", "quant.fuse_siblings=true"]}
    emit(f"{name}: dense bf16")
    emit(profile_decode(model, a.steps, a.rows, a.by_shape))
    for label, overrides in variants.items():
        m = speed.compressed(model, tok, overrides)
        kernels = prepare_for_inference(m, "cpu", torch.bfloat16,
                                        **({"serve_dense": ()} if a.no_serve_dense else {}))
        counts = {k: list(kernels.values()).count(k) for k in sorted(set(kernels.values()))}
        emit(f"{name}: {label}, layers per kernel {counts}")
        emit(profile_decode(m, a.steps, a.rows, a.by_shape))
        del m
    out = speed.RESULTS / f"decode_profile_{name}.txt"
    run = f"Written by `python benchmarks/decode_profile.py {' '.join(sys.argv[1:])}`"
    out.write_text("\n".join([run, "", *log, ""]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
