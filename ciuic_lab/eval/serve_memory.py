"""Serving memory: what a fresh process needs to load a model, prepare it and evaluate it.

    metrics.update(serving_memory(cfg, windows, model, tokenizer, checkpoint_dir, notes))

    python -m ciuic_lab.eval.serve_memory --checkpoint DIR --windows W.safetensors --out R.json
    python -m ciuic_lab.eval.serve_memory --model NAME --dtype float32 --windows ... --out ...

`mem/peak_bytes` is read inside the run's own process, which still holds what calibration and
compression left behind (allocator pages, caches, the dense model's imports and buffers), so it
cannot show what the packed storage saves. Here a child process imports everything first, then
loads the compressed checkpoint (or the dense model from its name or path), prepares its kernels
as the evaluation suite does, and runs the first `eval.serve_windows` evaluation windows in
batches of `eval.batch_size`. It reports the peak over that part only: on CPU the peak RSS above
the RSS after imports (VmHWM reset there through /proc/self/clear_refs; sampled where it cannot
be), on CUDA `torch.cuda.max_memory_allocated`.

Metrics: `mem/serve_peak_bytes` and `mem/serve_peak_kind` (and `_dense`: the dense model's, cached
on disk like its perplexity). A child that fails records `mem/serve_error` (`_dense`) and a note;
the run's other metrics stand.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("ciuic_lab")

WINDOWS = "windows"  # the tensor's name in the windows file


# ---- the parent: called by the runner ----------------------------------------------------------
def serving_memory(cfg, windows, model, tokenizer, checkpoint_dir: str | Path | None,
                   notes: list[str], out_dir: str | Path | None = None,
                   dense: bool = True) -> dict:
    """Serving memory of the compressed model and of the dense one (see the module docstring).

    `model`: the compressed model, not yet prepared for kernels, or None when the run could not
    hold it whole (then it is skipped with a note). `checkpoint_dir`: where it is saved, if it
    is; else it is saved for the measurement into a temporary directory (inside `out_dir` when
    given, on the same disk as the run's results) removed afterwards. `dense`: whether the run
    could hold the dense model whole.
    """
    import torch
    from safetensors.torch import save_file

    from ciuic_lab.models.loader import pick_device, pick_dtype

    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.model.dtype, device)
    n = min(int(cfg.eval.serve_windows), int(windows.shape[0]))
    out: dict = {}
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the child needs the room this process's cache would keep
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="serve_memory_", dir=out_dir) as tmp:
        tmp = Path(tmp)
        save_file({WINDOWS: windows[:n].contiguous().cpu()}, str(tmp / "windows.safetensors"))
        common = ["--windows", str(tmp / "windows.safetensors"), "--device", str(device),
                  "--batch-size", str(int(cfg.eval.batch_size))]
        if model is None:  # a fresh process could not hold it either
            notes.append("serving memory (mem/serve_peak_bytes) skipped: the compressed model "
                         "was not held whole")
        else:
            if checkpoint_dir is None:
                from ciuic_lab.compress.store.checkpoint import save

                checkpoint_dir = save(model, tmp / "compressed", tokenizer=None)
            out.update(_measure("compressed", ["--checkpoint", str(checkpoint_dir), *common],
                                tmp, notes))
        if dense:
            out.update(_dense(cfg, device, dtype, windows[:n], common, tmp, notes))
        else:
            notes.append("serving memory of the dense model (mem/serve_peak_bytes_dense) "
                         "skipped: the run did not hold it whole")
    return out


def _dense(cfg, device, dtype, windows, common: list[str], tmp: Path, notes: list[str]) -> dict:
    """The dense model's serving memory, cached on disk: it is the same for every sweep point."""
    import hashlib

    from ciuic_lab import cache
    from ciuic_lab.eval.suite import dense_key

    m = cfg.model
    args = ["--model", str(m.name_or_path), "--dtype", str(dtype).removeprefix("torch."),
            "--seed", str(int(cfg.seed)), *common]
    if m.revision is not None:
        args += ["--revision", str(m.revision)]
    if m.trust_remote_code:
        args.append("--trust-remote-code")
    if m.get("experts_implementation"):
        args += ["--experts-implementation", str(m.experts_implementation)]
    key = dense_key(cfg, dtype, device, hashlib.sha256(windows.numpy().tobytes()).hexdigest(),
                    int(cfg.eval.batch_size), str(m.get("experts_implementation")))

    def measure() -> dict:
        result = _measure("dense", args, tmp, notes)
        if "mem/serve_error_dense" in result:
            raise _Failed(result["mem/serve_error_dense"])  # never cache a failure
        return result

    try:
        return cache.cached("dense_serve_memory", key, measure)
    except _Failed as e:
        return {"mem/serve_error_dense": str(e)}


class _Failed(Exception):
    pass


def _measure(which: str, args: list[str], tmp: Path, notes: list[str]) -> dict:
    """Run the child; its metrics, or `mem/serve_error<suffix>` (and a note) when it fails."""
    import ciuic_lab

    suffix = "_dense" if which == "dense" else ""
    result = tmp / f"{which}.json"
    env = dict(os.environ)
    # the child must run this code, not whatever an installed copy of the package holds
    root = str(Path(ciuic_lab.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "ciuic_lab.eval.serve_memory", *args,
                           "--out", str(result)], capture_output=True, text=True, env=env,
                          check=False)
    if proc.returncode == 0 and result.exists():
        r = json.loads(result.read_text())
        return {f"mem/serve_peak_bytes{suffix}": int(r["peak_bytes"]),
                f"mem/serve_peak_kind{suffix}": r["kind"]}
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    why = lines[-1].strip() if lines else f"no output (exit status {proc.returncode})"
    error = (f"serving memory of the {which} model: the measuring process failed "
             f"(exit status {proc.returncode}): {why}")
    log.warning("%s\n%s", error, "\n".join(lines[-20:]))
    notes.append(error)
    return {f"mem/serve_error{suffix}": error}


# ---- the child: a fresh process ----------------------------------------------------------------
def _model_code(config) -> None:
    """Import the model's modelling code now, so that it counts as imports, not as serving."""
    from transformers import AutoModelForCausalLM

    try:
        AutoModelForCausalLM._model_mapping[type(config)]
    except (KeyError, AttributeError):
        pass  # remote code or an unmapped config: imported while loading instead


def _prepare(args) -> Callable[[], object]:
    """Everything imported and read that the measured part needs but is not the model: returns
    the loader to call inside the measurement."""
    import ciuic_lab.compress.store.kernels  # noqa: F401 (prepare imports it lazily)
    from ciuic_lab.compress.store import checkpoint
    from ciuic_lab.compress.store.serve import prepare_for_inference
    from ciuic_lab.models import loader

    if args.checkpoint is not None:
        from transformers import AutoConfig

        manifest = checkpoint.read_manifest(args.checkpoint)
        cfg = dict(manifest["model_config"])
        _model_code(AutoConfig.for_model(cfg.pop("model_type"), **cfg))

        def load():
            model = checkpoint.load(args.checkpoint, args.device)
            prepare_for_inference(model, args.device, next(model.parameters()).dtype)
            return model
    else:
        # held from here on: a tokenizer is not serving memory (the compressed child has none)
        tok = loader.load_tokenizer(args.model, args.trust_remote_code)
        _model_code(loader.load_config(args.model, args.trust_remote_code, args.revision))

        def load():
            return loader.load(args.model, dtype=args.dtype, device=args.device,
                               trust_remote_code=args.trust_remote_code,
                               experts_implementation=args.experts_implementation,
                               seed=args.seed, revision=args.revision, tokenizer=tok)[0]
    return load


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Peak memory of loading, preparing and evaluating "
                                 "a model in this (fresh) process.")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a compressed checkpoint directory")
    src.add_argument("--model", help="a dense model: name or path, as model.name_or_path")
    ap.add_argument("--windows", required=True, help="safetensors file with (n, seqlen) ids")
    ap.add_argument("--out", required=True, help="where the JSON result goes")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", help="dense model only")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0, help="tiny random models only")
    ap.add_argument("--revision", default=None)
    ap.add_argument("--trust-remote-code", action="store_true")
    ap.add_argument("--experts-implementation", default=None)
    args = ap.parse_args(argv)

    import gc

    import torch
    from safetensors.torch import load_file

    from ciuic_lab.eval.memory import PeakMemory
    from ciuic_lab.eval.perplexity import perplexity

    windows = load_file(args.windows)[WINDOWS]
    load = _prepare(args)
    device = torch.device(args.device)
    gc.collect()
    with torch.no_grad(), PeakMemory(device) as pm:
        model = load()
        ppl = perplexity(model, windows.to(device), batch_size=args.batch_size, progress=False)
    kind = pm.kind if pm.kind.startswith("cuda") else f"{pm.kind}_above_imports"
    result = {"peak_bytes": pm.peak_bytes - pm.start_bytes, "kind": kind, "method": pm.method,
              "ppl": ppl, "windows": int(windows.shape[0])}
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
