"""Evaluation and calibration data, bundled with their licences (no download at run time).

- `wikitext.test_windows(tokenizer, seqlen)`: WikiText-2 raw test, the perplexity protocol.
- `calibration.calibration_windows(tokenizer, n, seqlen, seed, source)`: seeded windows from a
  Wikipedia slice disjoint from that test set, or from a user's text file.
"""
