"""Mask coding: bits per weight (ours vs entropy limit vs today's format) and encode/decode time.

    nice -n 10 python benchmarks/mask_coding.py [--rows 7168 --cols 2048 --threads 1 --repeat 3]

Cases, on one (rows, cols) mask (default 7168x2048, a DeepSeek-V3 expert's down projection):
  - N:M 2:4, 4:8, 1:4, 3:8, 2:8, 8:16 from random scores; the limit is log2 C(M,N) / M and
    today's format is N·ceil(log2 M) / M.
  - unstructured, layer-wide count (i.i.d. density) at sparsity 0.5 .. 0.9; the limit is H(p).
  - Wanda-style: every row keeps exactly round((1 - s)·cols). Its limit given the per-row count is
    log2 C(cols, K) per row, which the "row-count limit" column shows next to H(p).
Today's format for unstructured masks is 1 bit per weight. Times are the best of --repeat runs on
CPU; "old dec" decodes today's format (packing.unpack_mask / unpack_bits + nm_mask).
Last, a small model's case: 128 masks of 256x256 decoded one by one and in one decode_masks call.
If `constriction` is importable (it is not a dependency) the unstructured rows also show its ANS
coder on the same bytes with an empirical byte histogram, for comparison.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import torch

from ciuic_lab.compress.store import coding, packing


def best_ms(fn, repeat):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return 1e3 * best, out


def nm_case(shape, n, m, repeat, gen):
    rows, cols = shape
    scores = torch.rand(rows, cols // m, m, generator=gen)
    mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(
        -1, scores.topk(n, -1).indices, True).view(shape)
    enc_ms, (stream, meta) = best_ms(lambda: coding.encode_mask(mask, (n, m)), repeat)
    dec_ms, back = best_ms(lambda: coding.decode_mask(stream, meta, shape), repeat)
    assert torch.equal(back, mask)
    bits = packing.nm_index_bits(m)
    idx = packing.nm_indices(mask, n, m)
    old = packing.pack_bits(idx, bits)
    old_ms, back = best_ms(lambda: packing.nm_mask(
        packing.unpack_bits(old, bits, idx.numel()).view_as(idx), m), repeat)
    assert torch.equal(back, mask)
    numel = mask.numel()
    return {"case": f"N:M {n}:{m}", "codec": f"{meta['codec']} k={meta['k']}",
            "ours": 8 * stream.numel() / numel, "limit": math.log2(math.comb(m, n)) / m,
            "old": 8 * old.numel() / numel, "enc_ms": enc_ms, "dec_ms": dec_ms, "old_dec_ms": old_ms}


def unstructured_case(name, mask, repeat, row_count=None):
    shape = tuple(mask.shape)
    numel = mask.numel()
    enc_ms, (stream, meta) = best_ms(lambda: coding.encode_mask(mask), repeat)
    dec_ms, back = best_ms(lambda: coding.decode_mask(stream, meta, shape), repeat)
    assert torch.equal(back, mask)
    old = packing.pack_mask(mask)
    old_ms, back = best_ms(lambda: packing.unpack_mask(old, shape), repeat)
    assert torch.equal(back, mask)
    p = mask.sum().item() / numel
    row = {"case": name, "codec": meta["codec"], "ours": 8 * stream.numel() / numel,
           "limit": coding.binary_entropy(p), "old": 8 * old.numel() / numel,
           "enc_ms": enc_ms, "dec_ms": dec_ms, "old_dec_ms": old_ms}
    if row_count is not None:
        rows, cols = shape
        row["row_limit"] = rows * math.log2(math.comb(cols, row_count)) / numel
    row.update(constriction_case(old.numpy(), numel, repeat))
    return row


def constriction_case(data, numel, repeat):
    try:
        import constriction
    except ImportError:
        return {}
    hist = np.bincount(data, minlength=256).astype(np.float64)
    model = constriction.stream.model.Categorical(hist / hist.sum(), perfect=False)
    sym = data.astype(np.int32)

    def enc():
        coder = constriction.stream.stack.AnsCoder()
        coder.encode_reverse(sym, model)
        return coder.get_compressed()

    enc_ms, comp = best_ms(enc, repeat)
    dec_ms, out = best_ms(lambda: constriction.stream.stack.AnsCoder(comp).decode(model, sym.size),
                          repeat)
    assert (out == sym).all()
    # + the 256-entry histogram the decoder would need (as 16-bit counts)
    return {"c_bpw": (32 * comp.size + 256 * 16) / numel, "c_enc_ms": enc_ms, "c_dec_ms": dec_ms}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=7168)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = (args.rows, args.cols)
    gen = torch.Generator().manual_seed(0)
    print(f"mask {shape[0]}x{shape[1]}, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    rows = []
    for n, m in [(2, 4), (4, 8), (1, 4), (3, 8), (2, 8), (8, 16)]:
        rows.append(nm_case(shape, n, m, args.repeat, gen))
    for s in (0.5, 0.6, 0.7, 0.8, 0.9):
        scores = torch.rand(shape, generator=gen)
        n_keep = round((1 - s) * scores.numel())
        mask = torch.zeros(scores.numel(), dtype=torch.bool)
        mask[scores.view(-1).topk(n_keep).indices] = True
        rows.append(unstructured_case(f"unstructured {s:.1f}", mask.view(shape), args.repeat))
    for s in (0.5, 0.6, 0.7, 0.8, 0.9):
        scores = torch.rand(shape, generator=gen)
        k = round((1 - s) * shape[1])
        mask = torch.zeros(shape, dtype=torch.bool).scatter_(1, scores.topk(k, 1).indices, True)
        rows.append(unstructured_case(f"per-row {s:.1f}", mask, args.repeat, row_count=k))

    has_c = any("c_bpw" in r for r in rows)
    head = ("| case | codec | ours b/w | limit b/w | over limit | row-count limit | old b/w "
            "| enc ms | dec ms | old dec ms |")
    sep = "|---|---|---|---|---|---|---|---|---|---|"
    if has_c:
        head += " constriction b/w | c enc ms | c dec ms |"
        sep += "---|---|---|"
    print(head)
    print(sep)
    for r in rows:
        over = f"{100 * (r['ours'] / r['limit'] - 1):+.2f} %" if r["limit"] else "-"
        line = (f"| {r['case']} | {r['codec']} | {r['ours']:.4f} | {r['limit']:.4f} | {over} | "
                f"{r['row_limit']:.4f} | " if "row_limit" in r else
                f"| {r['case']} | {r['codec']} | {r['ours']:.4f} | {r['limit']:.4f} | {over} | - | ")
        line += f"{r['old']:.3f} | {r['enc_ms']:.0f} | {r['dec_ms']:.0f} | {r['old_dec_ms']:.0f} |"
        if has_c:
            line += (f" {r['c_bpw']:.4f} | {r['c_enc_ms']:.0f} | {r['c_dec_ms']:.0f} |"
                     if "c_bpw" in r else " - | - | - |")
        print(line)
    many_small(args.repeat, gen)


def many_small(repeat, gen, count=128, shape=(256, 256), sparsity=0.7):
    """A small model's case: many small masks, decoded one by one vs in one decode_masks call."""
    masks = [torch.rand(shape, generator=gen) >= sparsity for _ in range(count)]
    items = [(*coding.encode_mask(m), m.shape) for m in masks]
    one_ms, _ = best_ms(lambda: [coding.decode_mask(*it) for it in items], repeat)
    many_ms, outs = best_ms(lambda: coding.decode_masks(items), repeat)
    assert all(torch.equal(a, b) for a, b in zip(outs, masks))
    olds = [packing.pack_mask(m) for m in masks]
    old_ms, _ = best_ms(lambda: [packing.unpack_mask(o, shape) for o in olds], repeat)
    bpw = 8 * sum(it[0].numel() for it in items) / sum(m.numel() for m in masks)
    print(f"\n{count} masks of {shape[0]}x{shape[1]} at sparsity {sparsity}: {bpw:.4f} b/w; decode "
          f"one by one {one_ms:.0f} ms, decode_masks {many_ms:.0f} ms, old unpack_mask "
          f"{old_ms:.0f} ms")


if __name__ == "__main__":
    main()
