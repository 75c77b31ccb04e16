"""Rebuild the bundled calibration slice from a copy of the Wikipedia page corpus.

    python -m ciuic_lab.tools.make_calib --corpus PAGES_DIR [--every 12] [--out DIR]

Selection is deterministic: page files sorted by name, every k-th from the first. Each article is
rewritten into WikiText style (the format the reference models were trained and are evaluated in)
and the articles are concatenated into `wikipedia-calib.txt`; `articles.tsv` lists them with the
sha256 of their source file. Run once by the maintainers; nothing at run time calls it.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from ciuic_lab.data.calibration import CALIB_DIR
from ciuic_lab.tools.wikistyle import title_from_filename, to_wikitext_style


def select(files: list[Path], every: int) -> list[Path]:
    return sorted(files, key=lambda p: p.name)[::every]


def build(corpus: Path, out: Path, every: int = 12) -> tuple[int, int]:
    """Write the slice and its article list; returns (articles, bytes of text)."""
    pages = select([p for p in corpus.iterdir() if p.suffix in (".md", ".txt")], every)
    if not pages:
        raise FileNotFoundError(f"no .md/.txt pages in {corpus}")
    out.mkdir(parents=True, exist_ok=True)
    texts, rows = [], ["file\ttitle\tsource_sha256"]
    for p in pages:
        raw = p.read_bytes()
        texts.append(to_wikitext_style(raw.decode("utf-8"), title_from_filename(p.name)))
        rows.append(f"{p.name}\t{title_from_filename(p.name)}\t{hashlib.sha256(raw).hexdigest()}")
    text = "".join(texts)
    (out / "wikipedia-calib.txt").write_text(text, encoding="utf-8")
    (out / "articles.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return len(pages), len(text.encode("utf-8"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="rebuild the bundled Wikipedia calibration slice")
    ap.add_argument("--corpus", required=True, type=Path, help="directory of Wikipedia pages")
    ap.add_argument("--every", type=int, default=12)
    ap.add_argument("--out", type=Path, default=CALIB_DIR)
    args = ap.parse_args(argv)
    n, size = build(args.corpus, args.out, args.every)
    print(f"{n} articles, {size} bytes -> {args.out}")


if __name__ == "__main__":
    main()
