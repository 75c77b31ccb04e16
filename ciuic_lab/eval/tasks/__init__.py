"""Bundled lm-eval task definitions (one folder per task: YAML + data + PROVENANCE.md).

`TASKS_DIR` is scanned by `ciuic_lab.eval.lm_eval_bridge`; see README.md for how each task
differs from lm-eval's standard definition and how to add one.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).parent
