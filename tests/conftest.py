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

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
