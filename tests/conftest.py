import os
import tempfile

# Offline and quiet: no hub, no W&B network, no prompts.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CIUIC_LAB_CACHE", tempfile.mkdtemp(prefix="ciuic_lab_cache_"))
# datasets writes Arrow caches of local task files; keep them out of ~/.cache (read at import).
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="hf_datasets_cache_"))
# Test models are tiny: one thread each avoids OpenMP oversubscription (spinning threads made
# small SVDs and matmuls 10x slower whenever another process shared the 2 cores). Subprocesses
# (CLI tests) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# CI cannot tell a skipped test from a passing one, so with CIUIC_LAB_NO_SKIPS=1 (set by .ci/run,
# which installs every extra) any skip other than a GPU test's fails the session.
_UNEXPECTED_SKIPS: list[str] = []


def _no_skips() -> bool:
    return os.environ.get("CIUIC_LAB_NO_SKIPS") == "1"


def _reason(report) -> str:
    return report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)


def pytest_runtest_logreport(report):
    if report.skipped and _no_skips() and "gpu" not in report.keywords:
        _UNEXPECTED_SKIPS.append(f"{report.nodeid}: {_reason(report)}")


def pytest_collectreport(report):
    # A module-level importorskip skips the whole file while it is collected, where no test
    # report sees it: a broken optional install would drop all its tests silently.
    if report.skipped and _no_skips():
        _UNEXPECTED_SKIPS.append(f"{report.nodeid}: {_reason(report)}")


def pytest_sessionfinish(session, exitstatus):
    if _UNEXPECTED_SKIPS:
        print("\nunexpected skips (CIUIC_LAB_NO_SKIPS=1):\n  " + "\n  ".join(_UNEXPECTED_SKIPS))
        session.exitstatus = 1
