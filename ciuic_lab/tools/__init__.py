"""Offline tooling the maintainers ran once to build what the package ships: the reference
models' pretraining, their tokenizer, their model cards, the WikiText-style rewriting of the
training and calibration text. Nothing at run time imports this package (a test checks)."""
