"""Streamed compression keeps host memory at about one block, whatever the depth: measured.

    nice python benchmarks/streamed_memory.py [--depths 10 20] [--out /tmp/streamed_bench] [OVERRIDES]

Writes two random DeepSeek-V3-shaped checkpoints (benchmarks/random_checkpoint.py, shape
deepseek-v3-bench: MLA attention, a dense first layer, MoE layers with 8 routed experts of
1536x2048 and a shared one; bf16 shards, one per block, with an index) of the two depths, the
deeper about 3 GB, then compresses each with the default `ciuic` recipe in streamed mode
(`compress.stream=true`, evaluation block by block too) through the CLI, each in a fresh
process, and prints per depth: checkpoint size, the whole process's peak RSS, the compression's
peak host memory (`mem/compress_peak_host_bytes`), time and bits/param. The property: peak RSS
below the shallower checkpoint's size, and less than 10 % growth when the depth doubles.

Measured on 2 CPU cores (about 90 minutes, most of it the default recipe's per-layer maths;
the figures are in the README, section "Compressing a model larger than your memory"):

    python benchmarks/streamed_memory.py --depths 10 20 --out /work/sb \
        data.calib_samples=16 eval.max_windows=2 compress.expert_chunk=2

`compress.expert_chunk` sizes the routed experts held dense at once to the memory budget: at 8
(the default) a chunk of this shape is 300 MB in fp32, and on this small block it, not the
depth, sets the peak.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from random_checkpoint import write  # noqa: E402  (a sibling script)


def write_checkpoint(out: Path, layers: int) -> int:
    if not (out / "config.json").exists():
        write(out, "deepseek-v3-bench", layers)
    return sum(p.stat().st_size for p in out.glob("*.safetensors"))


def compress(src: Path, run: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "ciuic_lab.run", "model=hub", f"model.name_or_path={src}",
           "compress.stream=true", "eval.stream=true", "eval.max_windows=4",
           "eval.lm_eval.enabled=false", "eval.generate.enabled=false", "eval.speed=false",
           "tracker=none", f"hydra.run.dir={run}", *extra]
    t0 = time.perf_counter()
    run.mkdir(parents=True, exist_ok=True)
    # os.wait4 gives this child's own peak RSS; RUSAGE_CHILDREN would be the maximum over every
    # child so far, which lets the deeper run hide behind the shallower one.
    with open(run / "stdout.log", "w") as out, open(run / "stderr.log", "w") as err:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err,
                             env=dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled"))
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise SystemExit((run / "stderr.log").read_text()[-3000:])
    m = json.loads((run / "result.json").read_text())["metrics"]
    return {"peak_rss": usage.ru_maxrss * 1024, "wall_s": time.perf_counter() - t0, **m}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", type=int, nargs=2, default=[10, 20])
    ap.add_argument("--out", type=Path, default=Path("/tmp/streamed_bench"))
    ap.add_argument("overrides", nargs="*",
                    help="extra run overrides for both depths, e.g. data.calib_samples=16")
    args = ap.parse_args()
    rows = {}
    for depth in args.depths:
        size = write_checkpoint(args.out / f"v3-{depth}", depth)
        print(f"depth {depth}: checkpoint {size / 2**30:.2f} GiB, compressing...", flush=True)
        rows[depth] = {"size": size, **compress(args.out / f"v3-{depth}",
                                               args.out / f"run-{depth}", args.overrides)}
    print(f"\n{'layers':>6s} {'checkpoint GiB':>14s} {'process peak RSS GiB':>20s} "
          f"{'compress peak host GiB':>22s} {'compress s':>10s} {'profile s':>9s} {'bits/param':>10s} "
          f"{'ppl dense -> compressed':>24s}")
    for depth, r in rows.items():
        print(f"{depth:6d} {r['size'] / 2**30:14.2f} {r['peak_rss'] / 2**30:20.2f} "
              f"{r['mem/compress_peak_host_bytes'] / 2**30:22.2f} {r['time/compress_s']:10.0f} "
              f"{r['time/profile_s']:9.0f} "
              f"{r['size/bits_per_param']:10.3f} "
              f"{r['ppl/wikitext2_dense']:11.1f} -> {r['ppl/wikitext2']:.1f}")
    lo, hi = args.depths
    growth = rows[hi]["peak_rss"] / rows[lo]["peak_rss"] - 1
    print(f"\npeak RSS below the {lo}-layer checkpoint: "
          f"{rows[lo]['peak_rss'] < rows[lo]['size'] and rows[hi]['peak_rss'] < rows[lo]['size']}; "
          f"growth {lo} -> {hi} layers: {100 * growth:+.1f} % (goal < 10 %)")


if __name__ == "__main__":
    main()
