"""Storage: how a compressed weight is held, counted, saved and run, whatever method made it.

    packing     k-bit codes packed into bytes, and unpacked
    coding      kept-entry masks entropy-coded near their limit (N:M choices, unstructured runs)
    linear      CompressedLinear: a LayerState packed into buffers (base, mask, grid, low-rank)
    formats     the packed-layer contract and the FORMATS registry (format key -> class)
    checkpoint  a compressed model saved as JSON + safetensors shards and loaded bit-identically
    kernels     re-encodings of a packed base for the device's fast matmuls
    serve       a compressed model made ready to compute (kernels, or weights materialised)

The methods (prune, quant, lowrank, rotate, tune) decide what the weights become; the walk
(pipeline, blocks) applies them block by block; this package only stores and runs the result.
"""
