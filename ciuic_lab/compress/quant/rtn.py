"""Round-to-nearest (RTN) uniform quantisation, any k in 2..8, per-group grids, sym or asym.

The data-free baseline of LLM weight quantisation (see the RTN rows of GPTQ, arXiv 2210.17323,
and LLM.int8(), arXiv 2208.07339). With a mask, only kept weights set the grid range, so pruning
and quantisation compose without pruned zeros stretching the scale.
"""

from dataclasses import dataclass

from ciuic_lab.compress.base import QuantMethod
from ciuic_lab.compress.state import rtn_quantize


@dataclass
class RTN(QuantMethod):
    def quantize(self, w, mask, stats, bits, group_size):
        return rtn_quantize(w, bits, group_size, self.sym, mask)
