"""CIUIC_LAB_NO_SKIPS=1 (CI, every extra installed) turns every non-GPU skip into a failure,
including a whole module skipped while it is collected (a module-level importorskip)."""

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).with_name("conftest.py")


@pytest.fixture
def project(pytester):
    """A tiny suite under the lab's conftest: one passing test, one module whose optional
    import is missing."""
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(
        test_fine="def test_fine():\n    assert True\n",
        test_optional=(
            "import pytest\n\n"
            "pytest.importorskip('ciuic_lab_no_such_module')\n\n\n"
            "def test_never_runs():\n    pass\n"),
    )
    return pytester


def test_a_module_skipped_at_collection_fails_the_session(project, monkeypatch):
    monkeypatch.setenv("CIUIC_LAB_NO_SKIPS", "1")
    result = project.runpytest("-p", "no:cacheprovider")
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*unexpected skips*", "*test_optional.py*ciuic_lab_no_such_module*"])


def test_without_the_variable_the_skip_is_allowed(project, monkeypatch):
    monkeypatch.delenv("CIUIC_LAB_NO_SKIPS", raising=False)
    result = project.runpytest("-p", "no:cacheprovider")
    assert result.ret == 0
    result.assert_outcomes(passed=1, skipped=1)
