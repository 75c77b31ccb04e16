"""One compression on 1 and on N processes (torch.distributed): time, memory per rank, same bytes.

    nice python benchmarks/distributed.py [--layers 3] [--ranks 1 2] [--out /tmp/dist_bench]
                                          [--device cpu|cuda] [OVERRIDES]

Writes a random DeepSeek-V3-shaped checkpoint (benchmarks/random_checkpoint.py, shape
deepseek-v3-bench: MLA attention, a dense first layer, MoE layers of 8 routed experts of
2048x1536 and a shared one; `--layers` keeps the first blocks), then compresses it streamed
(`compress.stream=true`, evaluation block by block too) through the CLI once per entry of
`--ranks`: one process with `python -m ciuic_lab.run`, N with `torchrun --standalone
--nproc-per-node N -m ciuic_lab.run`, each rank with one thread on CPU (`OMP_NUM_THREADS=1`: a
core per rank, as a GPU per rank on a GPU machine). Prints and writes
benchmarks/results/distributed_<shape>.md: compression time, the speed-up over one process,
each rank's compression peak (host and device) and share of the layer work, mean time per MoE
block, perplexity, and whether the shards are byte-identical to the one-process run's (sha256).

Measured on 2 CPU cores (the default arguments; the table and its command are in
benchmarks/results/distributed_deepseek-v3-bench.md):

    python benchmarks/distributed.py --layers 3 --ranks 1 2

The recipe is GPTQ alone (4-bit g128) by default, so that the run takes minutes on CPU;
`--recipe ciuic` runs the default recipe, profile passes (OWL, Fisher) included, and writes
distributed_<shape>_ciuic.md. Any run override can be added after the options.
On a multi-GPU machine: `--device cuda --ranks 1 2 4 8`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from random_checkpoint import write  # noqa: E402  (a sibling script)

SHAPE = "deepseek-v3-bench"
RECIPES = {  # --recipe: what is compressed
    "gptq": ["recipe=none", "prune=none", "lowrank=none", "quant=gptq", "quant.bits=4",
             "quant.group_size=128"],
    "ciuic": ["recipe=ciuic"],  # the default recipe: OWL and Fisher profile passes included
}
RUN = ["compress.stream=true", "eval.stream=true", "data.calib_samples=8",
       "data.calib_seqlen=512", "compress.batch_size=2", "eval.seqlen=512", "eval.max_windows=4",
       "eval.batch_size=1", "eval.lm_eval.enabled=false", "eval.generate.enabled=false",
       "eval.speed=false", "eval.serve_memory=false", "tracker=none", "progress=false"]


def compress(src: Path, run: Path, ranks: int, device: str, recipe: str,
             extra: list[str]) -> dict:
    launcher = [sys.executable] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    cmd = [*launcher, "-m", "ciuic_lab.run", "model=hub", f"model.name_or_path={src}",
           f"device={device}", *RECIPES[recipe], *RUN, *extra, f"hydra.run.dir={run}",
           "+force=true"]
    run.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1",
               CIUIC_LAB_CACHE=str(run / "cache"))  # the dense baseline measured in every run
    t0 = time.perf_counter()
    with open(run / "stdout.log", "w") as out, open(run / "stderr.log", "w") as err:
        p = subprocess.run(cmd, check=False, cwd=ROOT, stdout=out, stderr=err, env=env)
    if p.returncode:
        raise SystemExit((run / "stderr.log").read_text()[-3000:])
    res = json.loads((run / "result.json").read_text())
    shards = {f.name: hashlib.sha256(f.read_bytes()).hexdigest()
              for f in sorted((run / "compressed").glob("*.safetensors"))}
    return {"wall_s": time.perf_counter() - t0, "metrics": res["metrics"],
            "layers": res["layers"], "shards": shards, "cmd": " ".join(cmd[len(launcher):])}


def summary(ranks: int, r: dict, base: dict) -> dict:
    m, layers = r["metrics"], r["layers"]
    per_block = {}
    for row in layers:
        per_block[row["name"].split(".mlp.")[0].split(".self_attn.")[0]] = row["block_s"]
    moe = [s for name, s in per_block.items()
           if any(x["name"].startswith(name + ".mlp.experts.") for x in layers)]
    work = [sum(x.get("layer_s", 0.0) for x in layers if x.get("dist_rank", 0) == k)
            for k in range(ranks)]
    peaks = ([(m[f"dist/rank{k}/compress_peak_host_bytes"],
               m[f"dist/rank{k}/compress_peak_device_bytes"]) for k in range(ranks)]
             if ranks > 1 else [(m["mem/compress_peak_host_bytes"],
                                 m["mem/compress_peak_device_bytes"])])
    return {"ranks": ranks, "compress_s": m["time/compress_s"],
            "speedup": base["metrics"]["time/compress_s"] / m["time/compress_s"],
            "moe_block_s": sum(moe) / len(moe) if moe else float("nan"),
            "peaks": peaks, "work": work, "ppl": m["ppl/wikitext2"],
            "ppl_dense": m.get("ppl/wikitext2_dense", float("nan")),
            "bits": m["size/bits_per_param"], "same": r["shards"] == base["shards"],
            "wall_s": r["wall_s"]}


def table(rows: list[dict], device: str) -> str:
    gib = 2 ** 30
    what = "host" if device == "cpu" else "device"
    head = (f"| ranks | compress s | speed-up | mean MoE block s | compress peak {what} GiB per "
            "rank | layer work s per rank | ppl dense → compressed | bits/param | "
            "shards = 1 process |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for s in rows:
        peak = " / ".join(f"{(h if device == 'cpu' else d) / gib:.2f}" for h, d in s["peaks"])
        # one process records no per-layer times (its table is left as it always was)
        work = " / ".join(f"{w:.0f}" for w in s["work"]) if s["ranks"] > 1 else "–"
        lines.append(f"| {s['ranks']} | {s['compress_s']:.0f} | {s['speedup']:.2f}× | "
                     f"{s['moe_block_s']:.0f} | {peak} | {work} | {s['ppl_dense']:.2f} → "
                     f"{s['ppl']:.2f} | {s['bits']:.3f} | {'yes' if s['same'] else 'NO'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="gptq")
    ap.add_argument("--out", type=Path, default=Path("/tmp/dist_bench"))
    ap.add_argument("overrides", nargs="*", help="extra run overrides for every run")
    args = ap.parse_args()
    if args.ranks[0] != 1:
        raise SystemExit("--ranks must start with 1: the one-process run is the reference")
    src = args.out / f"{SHAPE}-{args.layers}"
    if not (src / "config.json").exists():
        write(src, SHAPE, args.layers)
    size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    print(f"checkpoint {src}: {size / 2**30:.2f} GiB, {args.layers} layers", flush=True)
    runs = {}
    for n in args.ranks:
        print(f"compressing on {n} process(es)...", flush=True)
        runs[n] = compress(src, args.out / f"run-{args.recipe}-{n}", n, args.device,
                           args.recipe, args.overrides)
    rows = [summary(n, runs[n], runs[1]) for n in args.ranks]
    text = table(rows, args.device)
    print("\n" + text)
    for s in rows[1:]:
        print(f"\n{s['ranks']} processes: compression {s['speedup']:.2f}× faster than one "
              f"(ratio of time/compress_s {s['compress_s']:.0f} / {rows[0]['compress_s']:.0f} "
              f"s = {s['compress_s'] / rows[0]['compress_s']:.2f}); shards identical: {s['same']}")
    cmd = " ".join(["python benchmarks/distributed.py", f"--layers {args.layers}",
                    "--ranks " + " ".join(map(str, args.ranks)),
                    *([f"--device {args.device}"] if args.device != "cpu" else []),
                    *([f"--recipe {args.recipe}"] if args.recipe != "gptq" else []),
                    *args.overrides])
    tail = "" if args.recipe == "gptq" else f"_{args.recipe}"
    out = ROOT / "benchmarks" / "results" / f"distributed_{SHAPE}{tail}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        f"# One compression on several processes: {SHAPE}, {args.layers} layers, "
        f"{args.recipe}, {args.device}\n\n"
        f"`{cmd}` (checkpoint {size / 2**30:.2f} GiB; each run: `{runs[1]['cmd']}`; "
        f"{'one thread per rank' if args.device == 'cpu' else 'one GPU per rank'})\n\n"
        f"{text}\n\n"
        "compress s: `time/compress_s` (rank 0's, profile pass included); speed-up: the "
        "one-process time over this one; compress peak: `mem/compress_peak_*` of each rank; "
        "layer work: the per-layer table's `layer_s` summed per `dist_rank` (how evenly the "
        "split fell); shards = 1 process: every safetensors shard byte-identical (sha256).\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
