"""ciuic_lab: compress DeepSeek language models (pruning, low-rank, quantisation), measured."""

__version__ = "0.1.0"


def compress(*args, **kwargs):
    from ciuic_lab.api import compress as _compress
    return _compress(*args, **kwargs)


def load(*args, **kwargs):
    from ciuic_lab.models.loader import load as _load
    return _load(*args, **kwargs)
