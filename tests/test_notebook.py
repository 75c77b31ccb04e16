"""notebooks/pareto_analysis.ipynb executes on a sweep made here and writes its figures and
ablation table next to the sweep's results."""

from pathlib import Path

import nbformat
import pandas as pd
import pytest
from test_experiments import POINTS, ablation_sweep

nbclient = pytest.importorskip("nbclient")
NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "pareto_analysis.ipynb"


def test_notebook_is_stored_clean_with_a_parameters_cell():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    assert all(not c.outputs and c.execution_count is None for c in code)  # no stale results


@pytest.mark.slow
def test_notebook_executes_on_a_sweep_and_writes_figures(tmp_path, monkeypatch):
    sweep = ablation_sweep()
    monkeypatch.setenv("CIUIC_SWEEP_DIR", str(sweep))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    for name in ("pareto_bits_ppl.png", "pareto_bits_acc.png", "pareto_mem_ppl.png"):
        png = sweep / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    results = pd.read_parquet(sweep / "results.parquet")
    table = pd.read_csv(sweep / "ablation.csv")
    combos = {p.replace("_", "+").replace("lowrank+quant", "quant+lowrank") for p in POINTS}
    assert set(table["combo"]) == combos  # stages named in cfg.stages order
    assert sorted(table["bits/param"]) == sorted(results["size/bits_per_param"].round(3))
    assert sorted(table["ppl"]) == sorted(results["ppl/wikitext2"].round(3))
    contrib = pd.read_csv(sweep / "ablation_contributions.csv").set_index("stage")
    assert set(contrib.index) == {"prune", "quant", "lowrank"}
    by = table.set_index("combo")["ppl"]
    assert contrib.at["prune", "contribution (ppl without - full)"] == pytest.approx(
        by["quant+lowrank"] - by["prune+quant+lowrank"], abs=2e-3)
