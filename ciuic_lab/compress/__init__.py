"""Compression core, in three parts.

    methods   prune/, quant/, lowrank/ (alternating: joint refinement), rotate/, tune/, policies/;
              their contracts in base.py, the layer they work on in state.py (LayerState), its
              calibration statistics in stats.py
    store/    how the result is held and run: packing, mask coding, CompressedLinear, packed
              routed experts, formats, checkpoints, kernels, serving
    walk/     the model compressed block by block: providers and activations (blocks), the plan
              and compress walks (pipeline), their split among processes (distributed)
"""
