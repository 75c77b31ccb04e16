"""One disk cache for dense baselines: computed once per key, atomic, torn entries recomputed."""

import json
import os

from ciuic_lab import cache


def test_computes_once_per_key_and_again_for_another(tmp_path, monkeypatch):
    monkeypatch.setenv("CIUIC_LAB_CACHE", str(tmp_path))
    calls = []

    def compute():
        calls.append(1)
        return {"ppl/wikitext2_dense": 10.0 + len(calls)}

    first = cache.cached("dense_ppl", ["model", "float32", 4], compute)
    assert cache.cached("dense_ppl", ["model", "float32", 4], compute) == first
    assert len(calls) == 1
    cache.cached("dense_ppl", ["model", "float32", 8], compute)  # the batch size is in the key
    assert len(calls) == 2
    assert len(list((tmp_path / "dense_ppl").glob("*.json"))) == 2
    assert not list((tmp_path / "dense_ppl").glob(".*.tmp"))  # no temporary left behind


def test_a_torn_entry_is_recomputed_not_trusted(tmp_path, monkeypatch):
    monkeypatch.setenv("CIUIC_LAB_CACHE", str(tmp_path))
    path = cache.path_for("dense_ppl", ["m"])
    path.parent.mkdir(parents=True)
    path.write_text('{"parts": ["m"], "value": {"ppl/wikitext2_de')  # a killed writer's half file
    assert cache.cached("dense_ppl", ["m"], lambda: {"x": 1.0}) == {"x": 1.0}
    assert json.loads(path.read_text())["value"] == {"x": 1.0}


def test_the_code_version_is_part_of_every_key(monkeypatch):
    k = cache.key(["m"])
    monkeypatch.setattr(cache, "code_version", lambda: "another version")
    assert cache.key(["m"]) != k


def test_code_version_covers_the_package_sources():
    v = cache.code_version()
    assert len(v) == 64 and all(c in "0123456789abcdef" for c in v)
    assert os.path.exists(cache.PACKAGE_DIR / "runner.py")
