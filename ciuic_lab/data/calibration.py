"""Calibration windows for compression: seeded random token windows from a text corpus.

The default source is the bundled 60-article Wikipedia slice (`bundled/wikipedia-calib/`, CC
BY-SA 3.0), taken from a corpus built to share no title and no word 10-gram with the WikiText-2
test (and validation) set, so calibrating never sees evaluation text. Random windows of a
general-text corpus are the calibration protocol of GPTQ (arXiv:2210.17323) and SparseGPT
(arXiv:2301.00774), which draw from C4; here the corpus is bundled so runs work offline.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ciuic_lab.data.layout import hf_stream
from ciuic_lab.data.tokens import cached_ids

CALIB_DIR = Path(__file__).parent / "bundled" / "wikipedia-calib"
SOURCES = {"wikipedia": CALIB_DIR / "wikipedia-calib.txt"}


def source_path(source: str) -> Path:
    """A bundled source name or a path to a user's UTF-8 .txt file."""
    if source in SOURCES:
        return SOURCES[source]
    p = Path(source).expanduser()
    if not p.is_file():
        raise FileNotFoundError(
            f"calibration source {source!r} is neither a bundled source ({', '.join(SOURCES)}) "
            f"nor an existing text file")
    return p


def check_source(source: str) -> Path:
    """The source's path, after checking it is a non-empty UTF-8 text (cheap: before any model
    is loaded, so a bad file fails in a second, not after the dense baseline)."""
    p = source_path(source)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    if not text.strip():
        raise ValueError(f"{p} is empty")
    return p


def calibration_ids(tokenizer, source: str = "wikipedia") -> torch.Tensor:
    """All token ids of the source text (no special tokens), 1-D; cached per tokenizer."""
    p = source_path(source)
    if source in SOURCES:
        # Bundled WikiText-style text is fed in the evaluation layout, the models' input format.
        return cached_ids(tokenizer, f"calib:{source}",
                          lambda: hf_stream(p.read_text(encoding="utf-8")))
    return cached_ids(tokenizer, f"calib:{p.resolve()}", lambda: p.read_text(encoding="utf-8"))


def sample_windows(ids: torch.Tensor, n: int, seqlen: int, seed: int) -> torch.Tensor:
    """(n, seqlen) windows starting at seeded uniform positions of the 1-D id stream."""
    if ids.numel() < seqlen:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than "
                         f"seqlen={seqlen}: use a longer text or a smaller data.calib_seqlen")
    g = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, ids.numel() - seqlen + 1, (n,), generator=g)
    return torch.stack([ids[s: s + seqlen] for s in starts.tolist()]) if n else ids.new_empty(0, seqlen)


def calibration_windows(tokenizer, n: int, seqlen: int, seed: int,
                        source: str = "wikipedia") -> torch.Tensor:
    """(n, seqlen) LongTensor of calibration windows, the same for the same seed.

    `source` is "wikipedia" (bundled, disjoint from the WikiText-2 test set) or a path to a .txt
    file. Raises ValueError if the text is shorter than one window.
    """
    return sample_windows(calibration_ids(tokenizer, source), n, seqlen, seed)
