"""Magnitude pruning: drop the smallest |w| of each layer.

The classic baseline (Han et al., "Learning both Weights and Connections for Efficient Neural
Networks", arXiv 1506.02626); for LLMs, Zhu & Gupta arXiv 1710.01878 and the comparisons in
SparseGPT (arXiv 2301.00774) and Wanda (arXiv 2306.11695). Needs no calibration data.
"""

from dataclasses import dataclass

import torch

from ciuic_lab.compress.base import PruneMethod


def magnitude_scores(w: torch.Tensor) -> torch.Tensor:
    return w.abs()


@dataclass
class Magnitude(PruneMethod):
    def scores(self, w, stats):
        return magnitude_scores(w)
