"""Row transforms the bundled task YAMLs call through `!function ciuic_lab.eval.tasks.process.X`.

Pure functions on `datasets.Dataset` objects, so they are testable without a model.
"""

from __future__ import annotations


def dedupe_choices(dataset):
    """Drop repeated answer options, keeping the first, and re-point `gold`.

    The MosaicML ICL copy of ARC pads 3-option questions to 4 with a duplicated distractor; this
    restores the 3 options of the original question (gold is never the duplicated one).
    """

    def _one(doc):
        seen: list[str] = []
        for c in doc["choices"]:
            if c not in seen:
                seen.append(c)
        gold_text = doc["choices"][doc["gold"]]
        return {"choices": seen, "gold": seen.index(gold_text)}

    return dataset.map(_one)


def split_pages(text: str) -> list[str]:
    """Split a WikiText raw file into articles as EleutherAI/wikitext_document_level does.

    An article starts at a top-level heading line (` = Title = `, not ` = = Section = = `); lines
    are kept verbatim (each page is its lines joined by "\\n"), and the whitespace-only line before
    the first heading, which belongs to no article, is dropped.
    """
    pages, current = [], []
    for line in text.split("\n"):
        compact = line.replace("= = =", "===").replace("= =", "==").strip()
        if compact.startswith("= ") and compact.endswith(" ="):
            page = "\n".join(current)
            if page.strip():
                pages.append(page)
            current = []
        current.append(line)
    pages.append("\n".join(current))
    return pages


def wikitext_pages(dataset):
    """`process_docs` for the bundled wikitext task: the whole file (one row) -> one row per page."""
    import datasets

    pages = [p for doc in dataset for p in split_pages(doc["text"])]
    return datasets.Dataset.from_dict({"page": pages})
