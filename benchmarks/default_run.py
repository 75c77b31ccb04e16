"""Time and peak memory of the default run (`python -m ciuic_lab.run`) on this machine.

    python benchmarks/default_run.py [extra overrides...]

Runs the CLI once in a subprocess (tracking disabled, into a temporary directory) and prints its
wall time, the process's peak RSS (getrusage of the child) and the run's own metrics from
result.json, so the numbers in an issue note can be reproduced by anyone.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main(extra: list[str]) -> None:
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "ciuic_lab.run", f"hydra.run.dir={d}", "tracker=none",
               "progress=false", *extra]
        env = dict(os.environ, CIUIC_LAB_CACHE=str(Path(d) / "cache"))  # no cached dense baseline
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=root, check=True, env=env)
        wall = time.perf_counter() - t0
        peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        res = json.loads((Path(d) / "result.json").read_text())
    m = res["metrics"]
    rows = [
        ("command", " ".join(["python -m ciuic_lab.run", *extra]) or "default"),
        ("model", res["config"]["model"]["name_or_path"]),
        ("wall time, whole run (s)", f"{wall:.1f}"),
        ("peak RSS, whole run (MiB)", f"{peak_rss / 2**20:.0f}"),
        ("time/compress_s", f"{m['time/compress_s']:.1f}"),
        ("time/eval_s", f"{m['time/eval_s']:.1f}"),
        ("mem/peak_bytes during eval (MiB)", f"{m['mem/peak_bytes'] / 2**20:.0f} ({m['mem/peak_kind']})"),
        ("mem/weight_bytes dense -> compressed",
         f"{m['mem/weight_bytes_dense']:,} -> {m['mem/weight_bytes']:,}"),
        ("size/bits_per_param (compressed layers)", f"{m['size/bits_per_param']:.3f}"),
        ("size/ratio_vs_fp16 (compressed layers)", f"{m['size/ratio_vs_fp16']:.2f}"),
        ("ppl/wikitext2 dense -> compressed",
         f"{m.get('ppl/wikitext2_dense', float('nan')):.2f} -> {m['ppl/wikitext2']:.2f}"),
    ]
    w = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{w}}  {v}" for k, v in rows))


if __name__ == "__main__":
    main(sys.argv[1:])
