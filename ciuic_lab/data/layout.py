"""The row layout of WikiText as the Hugging Face `wikitext` dataset (and every perplexity paper)
presents it: rows are the raw file's lines, and the evaluation stream joins them with "\\n\\n"."""

from __future__ import annotations


def hf_rows(text: str) -> list[str]:
    """The rows the HF `wikitext` dataset makes of a raw file: each line with its "\\n", and
    whitespace-only lines as ""."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the file's final newline ends the last row, it does not start a new one
    return [line + "\n" if line.strip() else "" for line in lines]


def hf_stream(text: str) -> str:
    """WikiText-style text as perplexity evaluations see it: its rows joined with "\\n\\n".

    Training on this exact layout (not the file's) removes the last format shift between the
    reference models' training text and the WikiText-2 evaluation stream.
    """
    return "\n\n".join(hf_rows(text))
