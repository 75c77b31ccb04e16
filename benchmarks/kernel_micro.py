"""One linear layer on CPU: reference forward vs kernel layouts vs dense, side by side.

    nice -n 10 python benchmarks/kernel_micro.py [--threads 2] [--shapes 2048x2048 11008x4096]

For each (out x in) shape, a random weight is quantised with RTN (4-bit g128 symmetric; 8-bit per
channel for the int8 row; 6-bit g128 for the int4x2 and bytes rows) and packed as CompressedLinear. Then, for M = 1 (decode) and
M = 512 (prefill) tokens, every variant runs in interleaved rounds (so load from other processes
hits all of them alike) and the median and minimum wall time are printed with ratios, and written
to benchmarks/results/kernel_micro_cpu.md:

    reference   CompressedLinear.forward, bf16 activations (rebuilds the dense weight each call)
    int4_cpu    the int4 layout (aten._weight_int4pack_mm_for_cpu), bf16 activations
    int8        the int8 layout on the 8-bit per-channel layer, bf16 activations
    int4x2_cpu  the 6-bit g128 layer as two int4 planes (Int4PairLayout), bf16 activations
    bytes       the same 6-bit layer from one byte per code, its weight rebuilt per call
    lowrank     the recipe's residual alone, as a prepared layer computes it on CPU: two thin
                matmuls of rank 0.02·out·in/(out + in) with float32 factors (bf16 in and out);
                what a prepared layer adds to its base kernel's time
    lowrank_bf16  the same with bf16 factors (oneDNN's bf16 path: ~20 µs a call at any size)
    dense_bf16  F.linear with a dense bf16 weight
    dense_fp32  F.linear with a dense fp32 weight (fp32 activations)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ciuic_lab.compress.policies import LayerProfile
from ciuic_lab.compress.quant.rtn import RTN
from ciuic_lab.compress.store.kernels import choose_kernel, kernel_name
from ciuic_lab.compress.store.linear import CompressedLinear, LayerState


def packed_layer(w: torch.Tensor, bits: int, group: int) -> CompressedLinear:
    state = LayerState.from_linear(w)
    method = RTN(bits, group, True)
    prof = [LayerProfile("l", "mlp", tuple(w.shape), 0)]
    method.apply(state, None, method.allocate(prof)["l"])
    return CompressedLinear.pack(state, torch.bfloat16)


def timed_rounds(fns: dict, rounds: int) -> dict[str, list[float]]:
    for f in fns.values():  # warm-up (allocator, first-call dispatch)
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return times


@torch.no_grad()
def bench_shape(out: int, cols: int, rounds: dict[int, int]) -> list[str]:
    """Prints the shape's timings; returns its rows of the results table."""
    rows = []
    torch.manual_seed(0)
    w = torch.randn(out, cols) * 0.02
    l4 = packed_layer(w, 4, 128)
    l8 = packed_layer(w, 8, -1)
    k4 = choose_kernel(l4, "cpu", torch.bfloat16)
    k8 = choose_kernel(l8, "cpu", torch.bfloat16)
    l6 = packed_layer(w, 6, 128)
    k6 = choose_kernel(l6, "cpu", torch.bfloat16)
    b6 = choose_kernel(l6, "cpu", torch.bfloat16, int4_pairs=False)
    assert kernel_name(k4) == "int4_cpu" and kernel_name(k8) == "int8"
    assert kernel_name(k6) == "int4x2_cpu" and kernel_name(b6) == "bytes"
    rank = max(1, round(0.02 * out * cols / (out + cols)))
    lr_u = torch.randn(out, rank, dtype=torch.bfloat16)
    lr_v = torch.randn(rank, cols, dtype=torch.bfloat16)
    lr_uf, lr_vf = lr_u.float(), lr_v.float()
    w_bf16 = l4.base_weight().bfloat16()
    w_fp32 = l4.base_weight()
    print(f"\n{out} x {cols}: stored bytes  int4 packed {l4.nbytes():,}  int4 layout "
          f"{k4.nbytes():,}  int8 layout {k8.nbytes():,}  int4x2 layout {k6.nbytes():,}  bytes layout "
          f"{b6.nbytes():,}  dense bf16 {w_bf16.numel() * 2:,}")
    for m, n_rounds in rounds.items():
        x = torch.randn(m, cols, dtype=torch.bfloat16)
        xf = x.float()
        # same answers before timing: the layouts compute the reference's product
        ref = l4(x).float()
        err = (k4(x).float() - ref).norm() / ref.norm()
        fns = {"reference": lambda x=x: l4(x), "int4_cpu": lambda x=x: k4(x),
               "int8": lambda x=x: k8(x), "int4x2_cpu": lambda x=x: k6(x),
               "bytes": lambda x=x: b6(x),
               "lowrank": lambda x=x: F.linear(F.linear(x.float(), lr_vf), lr_uf).bfloat16(),
               "lowrank_bf16": lambda x=x: F.linear(F.linear(x, lr_v), lr_u),
               "dense_bf16": lambda x=x: F.linear(x, w_bf16),
               "dense_fp32": lambda xf=xf: F.linear(xf, w_fp32)}
        t = timed_rounds(fns, n_rounds)
        med = {k: statistics.median(v) for k, v in t.items()}
        print(f"  M={m:<4d} ({n_rounds} rounds; int4 vs reference rel. error {err:.1e}; "
              f"lowrank rank {rank})")
        print(f"    {'variant':<11s} {'median ms':>10s} {'min ms':>9s} {'ref/this':>9s} "
              f"{'this/bf16':>10s} {'this/fp32':>10s}")
        for k, v in t.items():
            print(f"    {k:<11s} {med[k]:10.2f} {min(v):9.2f} {med['reference'] / med[k]:9.1f} "
                  f"{med[k] / med['dense_bf16']:10.2f} {med[k] / med['dense_fp32']:10.2f}")
            rows.append(f"| {out} x {cols} | {m} | {k} | {med[k]:.3f} | {min(v):.3f} | "
                        f"{med[k] / med['dense_bf16']:.2f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", nargs="+", default=["2048x2048", "11008x4096"])
    ap.add_argument("--rounds-decode", type=int, default=20)
    ap.add_argument("--rounds-prefill", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, load average {os.getloadavg()[0]:.1f}")
    rows = []
    for s in a.shapes:
        out, cols = map(int, s.split("x"))
        rows += bench_shape(out, cols, {1: a.rounds_decode, 512: a.rounds_prefill})
    out_path = Path(__file__).resolve().parent / "results" / "kernel_micro_cpu.md"
    out_path.write_text("\n".join([
        f"Written by `python benchmarks/kernel_micro.py --threads {a.threads} --shapes "
        f"{' '.join(a.shapes)} --rounds-decode {a.rounds_decode} --rounds-prefill "
        f"{a.rounds_prefill}` (torch {torch.__version__}, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}; variants in the script's docstring; "
        "interleaved rounds, median and minimum wall time per call).", "",
        "| shape (out x in) | tokens M | variant | median ms | min ms | median vs dense bf16 |",
        "| --- | --- | --- | --- | --- | --- |", *rows, ""]))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
