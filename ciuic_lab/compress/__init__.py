"""Compression core, in three parts.

    methods   prune/, quant/, lowrank/ (alternating: joint refinement), rotate/, tune/, policies/,
              their contracts in base.py
    store/    how the result is held and run: packing, mask coding, CompressedLinear, formats,
              checkpoints, kernels, serving
    the walk  pipeline, blocks, state, stats, experts, walk_dist: the model compressed block by
              block, each layer's methods applied to its statistics
"""
