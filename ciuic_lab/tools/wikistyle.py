"""Rewrite plain Wikipedia prose into WikiText's tokenised style.

WikiText (Merity et al. 2016, arXiv:1609.07843) stores articles Moses-tokenised: spaces around
punctuation, ` @-@ ` for hyphens inside words, ` @,@ ` / ` @.@ ` inside numbers, headings as
` = Title = ` / ` = = Section = = `, every non-blank line starting and ending with a space. A
small model trained on plain prose pays a large format shift when evaluated on WikiText-2, so the
reference models are trained on text rewritten this way (as WikiText's own training split is).

Pure string functions (`to_wikitext_style(text, title)` for one article) and one reader,
`read_corpus(dir)`, for a directory of pages. The evaluation layout (`hf_rows`, `hf_stream`)
lives in the runtime package, `ciuic_lab.data.layout`.
"""

from __future__ import annotations

import re

# Sections after which a Wikipedia article has only apparatus; WikiText drops them.
_TAIL_SECTIONS = {
    "references", "external links", "see also", "notes", "further reading", "bibliography",
    "sources", "footnotes", "citations", "notes and references", "references and notes",
    "gallery", "works cited", "literature", "explanatory notes", "general references",
}
_ABBREVIATIONS = {
    "mr", "mrs", "ms", "dr", "st", "jr", "sr", "no", "co", "inc", "ltd", "gen", "col", "lt",
    "capt", "sgt", "rev", "prof", "vs", "mt", "ft", "fr", "gov", "sen", "rep", "corp", "bros",
    "ave", "maj", "cpl", "pvt", "adm", "cmdr", "hon", "messrs", "vol", "pp", "ca", "approx",
}

_CITATION = re.compile(
    r"\[(?:\d+(?:[,–-]\d+)*|[a-z]|note \d+|nb \d+|n \d+|[A-Za-z ]*needed|TABLE|citation)\](?![a-z])")
_WIKILINK = re.compile(r"\[\[?([^\[\]|]*)\|([^\[\]]*)\]\]")
_CAPTION = re.compile(r"^.*\]\]\s*")
_IMAGE = re.compile(r"\S+\.(?:png|jpe?g|svg|gif|tiff?|webp)\b", re.IGNORECASE)
_ITALIC = re.compile(r"(?<![\w])_([^_\n]+?)_(?![\w])")
_LIST = re.compile(r"^\s*(?:[-*•]|\d+\.)\s+")
_SPACES = re.compile(r"\s+")
_LATEX = re.compile(r"\\[A-Za-z]{2,}")
_RULE = re.compile(r"^[\s+=:|-]*-{3}[\s+=:|-]*$")
_CELLS = re.compile(r"\S {3,}\S")
# Characters that always stand alone in WikiText.
_PUNCT = re.compile(r"([,;:()\[\]\"!?%$£€¥&/#+=<>{}|~^*°—–…])")
_QUOTES = str.maketrans({"“": '"', "”": '"', "„": '"', "«": '"', "»": '"',
                         "‘": "'", "’": "'", "´": "'", "\u00a0": " ", "\u2009": " "})


def _case_from_title(line: str, title: str | None, first_para: bool) -> str:
    """Undo the converter's UPPER CASE rendering of bold text.

    A run of capitalised words equal to the title takes the title's casing; in the lead
    paragraph (where bold is used) other multi-word runs or long words are capitalised, while short
    single words (NASA, BBC) are left alone because they are usually real acronyms.
    """
    def fix(m: re.Match) -> str:
        run = m.group(0)
        if title and run.lower() == title.lower():
            return title
        words = run.split()
        if first_para and (len(words) > 1 or len(run) >= 5):
            return " ".join(w[:1] + w[1:].lower() for w in words)
        return run

    return re.sub(r"\b[A-Z][A-Z'’.\-]*[A-Z](?:\s+[A-Z][A-Z'’.\-]*[A-Z])*\b", fix, line)


def _is_table_or_math(line: str) -> bool:
    """Grid/simple tables and LaTeX the markdown conversion left behind; WikiText has neither."""
    s = _LIST.sub("", line).strip()
    cells = len(_CELLS.findall(s))  # prose never has runs of 3+ spaces inside a line
    indented = line.startswith("  ")
    return (s.startswith(("|", "+-", "+=")) or bool(_RULE.match(s)) or bool(_LATEX.search(s))
            or cells >= 2 or (indented and cells >= 1))


def _clean(line: str) -> str:
    line = _WIKILINK.sub(r"\2", line)
    if "]]" in line:
        line = _CAPTION.sub("", line)  # an inline image caption that runs up to "]]"
    line = _CITATION.sub("", line)
    line = _IMAGE.sub("", line)
    line = _ITALIC.sub(r"\1", line)
    line = line.translate(_QUOTES)
    return re.sub(r"'{2,}", "", line)  # leftover wiki italic/bold apostrophe markup


def _split_period(tok: str, last: bool) -> str:
    """Detach a final '.', as Moses does, unless the token is an abbreviation or an initial."""
    if not tok.endswith(".") or tok == "." or tok.endswith("..."):
        return tok
    stem = tok[:-1]
    if not last:
        if re.fullmatch(r"[A-Za-z]", stem) or "." in stem:
            return tok  # initials (J.) and dotted acronyms (U.S.)
        if stem.lower() in _ABBREVIATIONS:
            return tok
    return stem + " ."


def tokenize_line(line: str) -> str:
    """One line of prose in WikiText's token style, without the surrounding spaces."""
    # The @x@ markers go in as placeholders so the punctuation rules below leave them whole.
    s = line.replace("\x01", "").replace("\x02", "").replace("\x03", "")
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", " \x01 ", s)
    s = re.sub(r"(?<=\d)\.(?=\d)", " \x02 ", s)
    s = re.sub(r"(?<=[^\W_])-(?=[^\W_])", " \x03 ", s)
    s = re.sub(r"\.\.\.+|…", " ... ", s)
    s = _PUNCT.sub(r" \1 ", s)
    # Inner apostrophes split before themselves (Teddy 's, don 't); a placeholder keeps the
    # next rule, which isolates quote marks and plural possessives (Mencius '), off them.
    s = re.sub(r"(?<=[^\W_])'(?=[^\W_])", " \x00", s)
    s = re.sub(r"'", " ' ", s).replace("\x00", "'")
    s = re.sub(r"(?<=\s)-(?=\s)|^-|-$", " - ", s)
    toks = _SPACES.sub(" ", s).strip().split(" ")
    toks = [_split_period(t, i == len(toks) - 1) for i, t in enumerate(toks)]
    # A sentence-final period followed by a closing quote or bracket: 'said. "' -> 'said . "'
    out = " ".join(toks)
    out = re.sub(r"(?<=\w)\.(?= [\"')\]] |$| [\"')\]]$)", " .", out)
    out = out.replace("\x01", "@,@").replace("\x02", "@.@").replace("\x03", "@-@")
    return _SPACES.sub(" ", out).strip()


def _is_heading(lines: list[str], i: int) -> bool:
    s = _clean(lines[i]).strip()
    if i == 0 or not s or len(s) > 90 or _LIST.match(lines[i]) or s[-1] in ".,;:!?\"'":
        return False
    before = i == 0 or not lines[i - 1].strip()
    after = i + 1 >= len(lines) or not lines[i + 1].strip()
    return before and after and len(s.split()) <= 12


def to_wikitext_style(text: str, title: str | None = None) -> str:
    """Rewrite one plain-text Wikipedia article into WikiText's layout and tokenisation.

    Headings are bare lines between blank lines: after two blank lines they become level 2
    (` = = H = = `), after one level 3. The article stops at its References/See also section.
    Returns lines ending in "\\n", laid out like wiki.test.raw: a blank " " line around each
    heading, paragraphs on consecutive lines.
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    out: list[str] = []
    if title:
        out += [" ", f" = {tokenize_line(title)} = ", " "]
    first_para = True
    for i, raw in enumerate(lines):
        s = raw.strip()
        if not s or _is_table_or_math(raw):
            continue
        if _is_heading(lines, i):
            if s.lower() in _TAIL_SECTIONS:
                break
            level = 2 if i >= 2 and not lines[i - 2].strip() else 3
            bar = " ".join(["="] * level)
            head = tokenize_line(_clean(s))
            if head:
                if out and out[-1] != " ":
                    out.append(" ")
                out += [f" {bar} {head} {bar} ", " "]
            continue
        body = _case_from_title(_clean(_LIST.sub("", s)), title, first_para)
        first_para = False
        body = tokenize_line(body)
        if body:
            out.append(f" {body} ")
    return "".join(line + "\n" for line in out)


def title_from_filename(name: str) -> str:
    """Wikipedia file name (Coal.md, Danke_(song).md) -> article title."""
    stem = re.sub(r"\.(md|txt)$", "", name)
    return stem.replace("_", " ")


def read_corpus(corpus_dir) -> list[tuple[str, str]]:
    """[(file name, article in WikiText style)] for every .md/.txt page of a directory, sorted.

    The one I/O helper here, shared by the tokenizer trainer and the pretraining command.
    """
    from pathlib import Path

    root = Path(corpus_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"corpus directory not found: {root}")
    files = sorted(p for p in root.iterdir() if p.suffix in (".md", ".txt") and p.is_file())
    if not files:
        raise FileNotFoundError(f"no .md or .txt pages in {root}")
    return [(p.name, to_wikitext_style(p.read_text(encoding="utf-8"), title_from_filename(p.name)))
            for p in files]
