"""Evaluation: perplexity, memory (peak and stored bytes), speed."""
