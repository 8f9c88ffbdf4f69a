"""The dashboard reads reports: the report note it looks for (CROSSFIT_NOTE) comes from the light
report module, not from graphs.functional_report (crossfit, scipy, threadpoolctl), and it is the
one definition the report's writer uses."""

from __future__ import annotations

import ast
from pathlib import Path

import graphs.functional_report
import graphs.report
import service.dashboard.pages as pages


def test_the_crossfit_note_is_the_light_report_modules() -> None:
    note = graphs.report.CROSSFIT_NOTE
    assert pages.CROSSFIT_NOTE is note is graphs.functional_report.CROSSFIT_NOTE
    assert "cross-fitted" in note
    tree = ast.parse(Path(pages.__file__).read_text(encoding="utf-8"))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "graphs.report" in imported and "graphs.functional_report" not in imported
