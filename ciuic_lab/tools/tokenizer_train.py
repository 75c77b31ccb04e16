"""Train the bundled byte-level BPE tokenizer on a WikiText-style rewrite of a page corpus.

    python -m ciuic_lab.tools.tokenizer_train --corpus PAGES_DIR --vocab 8192 --out DIR

Byte-level BPE (Radford et al. 2019, GPT-2; BPE: Sennrich et al. 2015, arXiv:1508.07909) never
needs an unknown token, so any text (WikiText-2 test included) round-trips exactly. The output is
a standard `tokenizer.json` + `tokenizer_config.json` that `AutoTokenizer.from_pretrained` loads
offline as a fast tokenizer. Depends only on `tokenizers` and `transformers`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, PAD]


def train_bpe(texts, vocab_size: int = 8192, min_frequency: int = 2):
    """A `tokenizers.Tokenizer` (byte-level BPE, BOS prepended on encode) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: WikiText lines already start with a space, and adding one would make
    # the first word of a text encode differently from the same word mid-text.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=True)
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # DeepSeek and Llama tokenizers prepend BOS by default; add_special_tokens=False skips it.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return tok


def save_pretrained(tok, out_dir) -> Path:
    """Wrap as a transformers fast tokenizer and write tokenizer.json + tokenizer_config.json."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        # WikiText text has spaces before punctuation; the default clean-up would delete them
        # and break decode(encode(x)) == x.
        clean_up_tokenization_spaces=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    # transformers 5 writes its internal class name; the public alias also loads in 4.x.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> Path:
    from ciuic_lab.data.layout import hf_stream
    from ciuic_lab.tools.wikistyle import read_corpus

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True, help="directory of .md/.txt Wikipedia pages")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--min-frequency", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    pages = read_corpus(args.corpus)
    # Trained on the evaluation layout (rows joined by blank lines) so its newline runs get merges.
    tok = train_bpe((hf_stream(text) for _, text in pages), args.vocab, args.min_frequency)
    out = save_pretrained(tok, args.out)
    print(f"tokenizer: vocab {tok.get_vocab_size()} from {len(pages)} pages -> {out}")
    return out


if __name__ == "__main__":
    main()
