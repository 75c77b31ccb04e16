"""Tracking: result.json per run, results loader and Pareto frontier, plots, W&B, sweep callback."""

# The frontier every sweep draws: stored bits per parameter against WikiText-2 perplexity, both
# minimised (the sweep summary, the Pareto sweeper's objectives and the notebook use it).
FRONTIER = ("size/bits_per_param", "ppl/wikitext2")

# The memory axis: what serving the model takes, measured in a fresh process (eval/serve_memory.py).
# Results from before it existed have only the run's in-process peak, which `serve_memory` (in
# results.py) falls back to, saying so.
SERVE_MEMORY = "mem/serve_peak_bytes"
PEAK_MEMORY = "mem/peak_bytes"
