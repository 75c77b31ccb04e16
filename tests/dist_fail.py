"""A torchrun entry for tests/test_dist.py: the lab's CLI, with rank 1 failing on the first routed
expert it compresses (a failure that only one rank meets, in the middle of the walk)."""

import os
import runpy

from ciuic_lab.compress.walk import pipeline

if os.environ.get("RANK") == "1":
    _call = pipeline._Compressor.__call__

    def _fail_on_experts(self, full, kind, *args, **kwargs):
        if kind == "expert":
            raise RuntimeError(f"injected failure on rank 1 at {full}")
        return _call(self, full, kind, *args, **kwargs)

    pipeline._Compressor.__call__ = _fail_on_experts

if __name__ == "__main__":  # as `python -m ciuic_lab.run` (Hydra finds conf/ from there)
    runpy.run_module("ciuic_lab.run", run_name="__main__", alter_sys=True)
