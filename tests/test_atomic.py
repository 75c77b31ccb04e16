"""Files and directories replaced whole: a writer killed mid-way leaves the previous version."""

import json

import pytest

from ciuic_lab import atomic, cache
from ciuic_lab.track import result
from ciuic_lab.track.result import read_result, write_result


class Killed(Exception):
    pass


def _dies_half_way(obj, f, **kw):
    """json.dump that writes the first half of the document, then dies."""
    text = json.dumps(obj, **kw)
    f.write(text[: len(text) // 2])
    f.flush()
    raise Killed


def _no_temporaries(d):
    return not [p for p in d.iterdir() if p.name.startswith(".")]


def test_an_interrupted_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def write(f):
        f.write("new, but only half of")
        raise Killed

    with pytest.raises(Killed):
        atomic.write_atomic(path, write)
    assert path.read_text() == "old" and _no_temporaries(tmp_path)
    atomic.write_text_atomic(path, "new")
    assert path.read_text() == "new" and _no_temporaries(tmp_path)


def test_result_json_interrupted_mid_write_keeps_the_previous_result(tmp_path, monkeypatch):
    write_result(tmp_path, config={"a": 1}, metrics={"ppl/wikitext2": 9.0}, layers=[],
                 status="ok", error=None)
    monkeypatch.setattr(result.json, "dump", _dies_half_way)
    with pytest.raises(Killed):
        write_result(tmp_path, config={"a": 2}, metrics={}, layers=[], status="failed", error="x")
    monkeypatch.undo()
    old = read_result(tmp_path)
    assert old["status"] == "ok" and old["metrics"] == {"ppl/wikitext2": 9.0}
    assert _no_temporaries(tmp_path)


def test_cache_entry_interrupted_mid_write_is_not_left_half_written(tmp_path, monkeypatch):
    monkeypatch.setenv("CIUIC_LAB_CACHE", str(tmp_path))
    path = cache.path_for("dense_ppl", ["m"])
    path.parent.mkdir(parents=True)
    path.write_text('{"foreign": true}')  # unreadable as an entry: recomputed and rewritten
    with monkeypatch.context() as m:
        m.setattr(cache.json, "dump", _dies_half_way)
        with pytest.raises(Killed):
            cache.cached("dense_ppl", ["m"], lambda: {"x": 1.0})
    assert json.loads(path.read_text()) == {"foreign": True}
    assert _no_temporaries(path.parent)
    assert cache.cached("dense_ppl", ["m"], lambda: {"x": 2.0}) == {"x": 2.0}


def test_a_directory_is_swapped_in_whole_and_orphans_of_dead_writers_are_removed(tmp_path,
                                                                                  monkeypatch):
    dst = tmp_path / "ckpt"
    dst.mkdir()
    (dst / "a").write_text("old")
    orphan = tmp_path / ".ckpt.tmp-999999@nohost@x"
    orphan.mkdir()
    dead = tmp_path / f".ckpt.tmp-999999@{atomic.socket.gethostname()}@y"
    dead.mkdir()
    monkeypatch.setattr(atomic, "_alive", lambda pid: pid != 999999)
    new = atomic.temp_dir_beside(dst)
    assert not dead.exists() and orphan.exists()  # another machine's: its pid means nothing here
    (new / "b").write_text("new")
    assert (dst / "a").read_text() == "old"  # untouched until the swap
    atomic.swap_in_dir(new, dst)
    assert sorted(p.name for p in dst.iterdir()) == ["b"] and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [orphan.name, "ckpt"]
