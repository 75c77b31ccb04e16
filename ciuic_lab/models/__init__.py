"""Models: loading (hub id, local directory, bundled, tiny random), the architecture adapters,
streaming sources, and the bundled reference models."""

from pathlib import Path

BUNDLED_DIR = Path(__file__).parent / "bundled"
TOKENIZER_DIR = BUNDLED_DIR / "tokenizer"
