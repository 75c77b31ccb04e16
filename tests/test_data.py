import hashlib
import re
from pathlib import Path

import pytest
import torch

from ciuic_lab.data import calibration, wikitext
from ciuic_lab.data.tokens import encode

PKG = Path(wikitext.__file__).parents[1]
TOKENIZER_DIR = PKG / "models" / "bundled" / "tokenizer"


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def test_bundled_test_file_is_canonical():
    digest = hashlib.sha256(wikitext.TEST_FILE.read_bytes()).hexdigest()
    assert digest == "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"
    for d in (wikitext.TEST_FILE.parent, calibration.CALIB_DIR):
        assert (d / "PROVENANCE.md").exists() and (d / "LICENSE.md").exists()
        assert "CC BY-SA 3.0" in (d / "PROVENANCE.md").read_text()


def test_calibration_slice_matches_its_provenance():
    text = (calibration.CALIB_DIR / "wikipedia-calib.txt").read_bytes()
    prov = (calibration.CALIB_DIR / "PROVENANCE.md").read_text()
    assert hashlib.sha256(text).hexdigest() in prov and f"{len(text):,} bytes" in prov
    rows = (calibration.CALIB_DIR / "articles.tsv").read_text().splitlines()[1:]
    assert len(rows) == 60 and all(r.split("\t")[1] in prov for r in rows)
    assert 0.8e6 < len(text) < 1.2e6


def test_test_rows_follow_hf_layout():
    rows = wikitext.wikitext2_test_rows()
    assert len(rows) == 4358
    assert rows[0] == "" and rows[1] == " = Robert Boulter = \n"
    assert all(r == "" or (r.endswith(" \n") and r.startswith(" ")) for r in rows)
    assert sum(r == "" for r in rows) == 1467  # the whitespace-only lines
    text = wikitext.wikitext2_test_text()
    assert len(text) == sum(map(len, rows)) + 2 * (len(rows) - 1)
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English")
    assert text.count(" = = ") > 600 and "@-@" in text


def test_windows_are_the_token_prefix(tok):
    ids = wikitext.test_ids(tok)
    assert ids.dim() == 1 and ids.numel() > 300_000
    assert ids[0].item() != tok.bos_token_id  # no special tokens
    for seqlen in (128, 1000):
        w = wikitext.test_windows(tok, seqlen)
        assert w.dtype == torch.long and w.shape == (ids.numel() // seqlen, seqlen)
        assert torch.equal(w.reshape(-1), ids[: w.numel()])
    assert tok.decode(ids[:6].tolist()).startswith("\n\n = Robert")


def test_windows_are_cached_and_safe_to_mutate(tok):
    w = wikitext.test_windows(tok, 256)
    w.zero_()  # a caller scribbling on its windows must not poison the cache
    assert wikitext.test_windows(tok, 256).sum() > 0


def test_calibration_seeded(tok):
    a = calibration.calibration_windows(tok, 8, 64, seed=0)
    b = calibration.calibration_windows(tok, 8, 64, seed=0)
    c = calibration.calibration_windows(tok, 8, 64, seed=1)
    assert a.shape == (8, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    ids = calibration.calibration_ids(tok)
    stream = ids.tolist()
    for row in a[:2].tolist():  # each window is a contiguous piece of the slice
        i = stream.index(row[0])
        while stream[i: i + 64] != row:
            i = stream.index(row[0], i + 1)


def test_calibration_from_user_file_and_errors(tok, tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text(" The quick brown fox jumps over the lazy dog . " * 20)
    w = calibration.calibration_windows(tok, 3, 16, seed=0, source=str(f))
    assert w.shape == (3, 16)
    assert "fox" in tok.decode(w.reshape(-1).tolist())
    with pytest.raises(ValueError, match="fewer than"):
        calibration.calibration_windows(tok, 1, 10_000, seed=0, source=str(f))
    with pytest.raises(FileNotFoundError, match="bundled source"):
        calibration.calibration_windows(tok, 1, 16, seed=0, source=str(tmp_path / "nope.txt"))


def _ngrams(text: str, n: int = 10) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z0-9]+", text.lower())
    return {tuple(words[i: i + n]) for i in range(len(words) - n + 1)}


def test_calibration_disjoint_from_test(tok):
    test_grams = _ngrams(wikitext.wikitext2_test_text())
    windows = calibration.calibration_windows(tok, 64, 256, seed=0)
    calib_text = " ".join(tok.decode(w.tolist()) for w in windows)
    # A 10-gram also sitting in ordinary prose ("one of the ...") would be a false alarm, but the
    # bundled corpus was filtered to share none with WikiText-2 test, so any hit is a leak.
    assert not (_ngrams(calib_text) & test_grams)
    sanity = " ".join(wikitext.wikitext2_test_text().split()[5000:5300])
    assert _ngrams(sanity) & test_grams  # the check itself can see an overlap


def test_encode_exact_on_long_text(tok):
    text = wikitext.wikitext2_test_text()[:200_000]
    assert tok.decode(encode(tok, text)) == text


def test_package_never_reads_shared_data():
    offenders = []
    for p in list(PKG.rglob("*.py")) + list((PKG.parent / "conf").rglob("*.yaml")):
        if "shared/data" in p.read_text(encoding="utf-8", errors="ignore"):
            offenders.append(str(p))
    assert not offenders, f"run-time code must use bundled copies, not shared/data: {offenders}"


def test_cache_keyed_on_tokenizer_content(tok):
    from transformers import AutoTokenizer

    from ciuic_lab.data.tokens import fingerprint

    other = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    assert fingerprint(other) == fingerprint(tok)
    other.add_tokens([" Robert Boulter"])  # a different tokenisation must not hit the cache
    assert fingerprint(other) != fingerprint(tok)
    assert wikitext.test_ids(other).numel() < wikitext.test_ids(tok).numel()
