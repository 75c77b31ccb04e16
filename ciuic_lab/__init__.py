"""ciuic_lab: compress DeepSeek language models (pruning, low-rank, quantisation), measured.

    import ciuic_lab
    from ciuic_lab.api import compress
    model, tok = ciuic_lab.load("tiny-random-deepseek-v3")
    model, report = compress(model, tok, ["prune.sparsity=0.5", "quant.bits=4"])
"""

__version__ = "0.1.0"


def load(*args, **kwargs):
    from ciuic_lab.models.loader import load as _load
    return _load(*args, **kwargs)
