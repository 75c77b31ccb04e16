"""Tracking: result.json per run, results loader and Pareto frontier, plots, W&B, sweep callback."""
