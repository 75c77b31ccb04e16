"""Compare two runs' result.json: every metric except time/* and mem/* peaks, the per-layer table
(without its timing columns), generations, notes, status, error and the saved/streamed checkpoint
shards (sha256). Usage: compare_runs.py BEFORE_DIR AFTER_DIR NAME... (benchmarks/identity_runs.sh
writes them). Exits 1 if any differs."""
import hashlib, json, sys
from pathlib import Path

VARY_METRICS = ("time/",)
VARY_MEM = ("mem/peak_bytes", "mem/compress_peak", "mem/serve_peak_bytes")  # measured peaks
VARY_ROW = {"block_s", "layer_s"}


def metrics(m):
    return {k: v for k, v in m.items()
            if not k.startswith(VARY_METRICS) and not k.startswith(VARY_MEM)
            and not k.startswith("speed/")}


def rows(layers):
    return [{k: v for k, v in r.items() if k not in VARY_ROW} for r in layers]


def shards(d):
    c = d / "compressed"
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(c.glob("*.safetensors"))} if c.exists() else {}


ok = True
before, after = Path(sys.argv[1]), Path(sys.argv[2])
for name in sys.argv[3:]:
    # the run directories differ by name only
    a = json.loads((before / name / "result.json").read_text().replace(str(before), "RUNS"))
    b = json.loads((after / name / "result.json").read_text().replace(str(after), "RUNS"))
    diffs = []
    ma, mb = metrics(a["metrics"]), metrics(b["metrics"])
    for k in sorted(set(ma) | set(mb)):
        if ma.get(k, "<absent>") != mb.get(k, "<absent>"):
            diffs.append(f"metric {k}: {ma.get(k, '<absent>')!r} -> {mb.get(k, '<absent>')!r}")
    if list(ma) != list(mb):
        diffs.append("metric key order differs")
    for key in ("status", "error", "generations", "notes", "config", "overrides"):
        if a.get(key) != b.get(key):
            diffs.append(f"{key} differs:\n  before {a.get(key)!r}\n  after  {b.get(key)!r}")
    ra, rb = rows(a["layers"]), rows(b["layers"])
    if ra != rb:
        n = sum(x != y for x, y in zip(ra, rb))
        diffs.append(f"per-layer table differs ({len(ra)} vs {len(rb)} rows, {n} rows differ)")
    sa, sb = shards(before / name), shards(after / name)
    if sa != sb:
        diffs.append(f"compressed shards differ: {sorted(set(sa.items()) ^ set(sb.items()))}")
    compared = (f"{len(ma)} metrics, {len(ra)} layer rows, {len(a.get('generations') or [])} "
                f"generations, {len(a.get('notes') or [])} notes, {len(sa)} shards")
    print(f"{name}: {'IDENTICAL' if not diffs else 'DIFFERENT'} ({compared}; "
          f"ignored: time/*, speed/*, measured mem peaks, block_s/layer_s)")
    for d in diffs:
        print("   ", d)
    ok &= not diffs
sys.exit(0 if ok else 1)
