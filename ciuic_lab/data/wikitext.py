"""WikiText-2 raw test stream, as perplexity papers evaluate it.

Protocol (GPTQ, arXiv:2210.17323; SparseGPT, arXiv:2301.00774; Wanda, arXiv:2306.11695): the
rows of the Hugging Face `wikitext-2-raw-v1` test split joined with "\\n\\n", tokenised once,
cut into non-overlapping windows of `seqlen`, the tail dropped. The test file is bundled
(`bundled/wikitext-2-raw/`, CC BY-SA 3.0), so no download and no `datasets` dependency.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from ciuic_lab.data.layout import hf_rows
from ciuic_lab.data.tokens import cached_ids

TEST_FILE = Path(__file__).parent / "bundled" / "wikitext-2-raw" / "wiki.test.raw"


def wikitext2_test_rows() -> list[str]:
    """The 4,358 rows of the HF test split: each line with its "\\n"; blank (" ") lines are ""."""
    return hf_rows(TEST_FILE.read_text(encoding="utf-8"))


@functools.cache
def wikitext2_test_text() -> str:
    return "\n\n".join(wikitext2_test_rows())


def test_ids(tokenizer) -> torch.Tensor:
    """All token ids of the test text (no BOS), 1-D; cached per tokenizer."""
    return cached_ids(tokenizer, "wikitext2-test", wikitext2_test_text)


def test_windows(tokenizer, seqlen: int) -> torch.Tensor:
    """(n_windows, seqlen) LongTensor: non-overlapping windows of the test ids, tail dropped."""
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2 to predict anything, got {seqlen}")
    ids = test_ids(tokenizer)
    n = ids.numel() // seqlen
    if n == 0:
        raise ValueError(f"WikiText-2 test has {ids.numel()} tokens, fewer than seqlen={seqlen}")
    return ids[: n * seqlen].view(n, seqlen)
