"""Tracking: result.json per run, results loader and Pareto frontier, plots, W&B, sweep callback."""

# The frontier every sweep draws: stored bits per parameter against WikiText-2 perplexity, both
# minimised (the sweep summary, the Pareto sweeper's objectives and the notebook use it).
FRONTIER = ("size/bits_per_param", "ppl/wikitext2")
