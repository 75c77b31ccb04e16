"""Tuning: after the stages chose every budget, change values inside the packed formats (codes,
scales, kept values, factors) so that the compressed model reproduces the dense one; never the
budgets, so bits/param is unchanged. `block.BlockTune` (tune=block) runs inside the block walk."""
