"""Compression core: packing, CompressedLinear, methods, policies and the block walk."""
