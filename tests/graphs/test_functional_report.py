"""Functional redundancy in the report (graphs.functional_report), in-sample and cross-fitted.

With held-out statistics (a part of the calibration data) the figure and the stored curve are
the cross-fitted ones of :func:`graphs.crossfit.crossfit_curves` along the whole pooled path, and
the report's notes say so; without them nothing changes. The planted case: a few source samples,
each seen at many positions (rows that are not independent, as in deep low-resolution layers),
where in-sample folds look free and are not."""

from __future__ import annotations

import numpy as np
import pytest

from graphs import InvalidInputError, analyze
from graphs.compensated import group_consumers
from graphs.crossfit import crossfit_curves
from graphs.functional_report import CROSSFIT_NOTE, functional_figures, with_functional
from graphs.options import DEFAULT_EPSILON, DEFAULT_RIDGE
from graphs.report import CheckpointInfo, Report
from graphs.transformer import adapt_manifest
from tests.graphs.chain import tiny_manifest
from tests.graphs.test_functional import gram

NAMES = {0: "a", 1: "b"}  # the tiny model's prunable groups: id -> producer


def planted(samples: int = 6, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(statistics of all the data, of its second half of samples) at b's input (8 channels,
    each sample at 16 positions with little spread) and fc's (24 features, one row a sample)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, 1, 8)) + 0.3 + 0.05 * rng.normal(size=(samples, 16, 8))
    f = rng.normal(size=(samples, 24)) + 0.3
    half = samples // 2
    stats = {"b": gram(x.reshape(-1, 8)), "fc": gram(f)}
    return stats, {"b": gram(x[half:].reshape(-1, 8)), "fc": gram(f[half:])}


def report_of(**kw: object) -> Report:
    man, layers = tiny_manifest()
    info = CheckpointInfo(sha256="0" * 64, format="pytorch", size_bytes=1, n_tensors=3, n_params=1)
    return analyze(layers, checkpoint=info, methods=["l1"], manifest=man, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("epsilon", [DEFAULT_EPSILON, 0.3, 2.0])
def test_the_cross_fitted_figure_is_the_reference_along_the_whole_path(epsilon: float) -> None:
    man, layers = tiny_manifest()
    stats, part = planted()
    got = functional_figures(layers, man, stats, epsilon=epsilon, holdout=part)
    found = group_consumers(layers, adapt_manifest(layers, man), stats)
    pooled = found.curves(sorted(found.consumers), ridge=DEFAULT_RIDGE)  # every channel
    ref = crossfit_curves(found, part, pooled, ridge=DEFAULT_RIDGE)
    assert set(got) == {NAMES[g] for g in ref} == {"a", "b"}
    for gid, curve in ref.items():
        fig = got[NAMES[gid]]
        assert fig.errors == [round(float(e), 9) for e in curve.errors]
        assert len(fig.errors) == curve.channels  # the whole path, k = 0 .. n - 1
        assert fig.redundancy == round(curve.redundancy(epsilon), 6)
        assert fig.epsilon == epsilon


def test_cross_fitting_finds_the_overfit_that_in_sample_misses() -> None:
    man, layers = tiny_manifest()
    stats, part = planted()
    inside = functional_figures(layers, man, stats)
    crossed = functional_figures(layers, man, stats, holdout=part)
    for name, fig in crossed.items():
        assert fig.redundancy <= inside[name].redundancy
        assert fig.consumers == inside[name].consumers
    # a's channels: 6 sample means in 8 dims look nearly exactly foldable in-sample
    assert crossed["a"].redundancy < inside["a"].redundancy


def test_without_held_out_statistics_the_report_is_unchanged() -> None:
    man, layers = tiny_manifest()
    stats, _ = planted()
    figures = functional_figures(layers, man, stats)
    found = group_consumers(layers, adapt_manifest(layers, man), stats)
    for gid, curve in found.curves(sorted(found.consumers), ridge=DEFAULT_RIDGE).items():
        assert figures[NAMES[gid]].errors == [round(float(e), 9) for e in curve.errors]
    plain = with_functional(report_of(), figures)
    assert plain.notes == [] and '"notes"' not in plain.to_json()
    assert with_functional(report_of(), figures, crossfit=False) == plain


def test_the_report_says_its_figures_are_cross_fitted_and_is_deterministic() -> None:
    man, layers = tiny_manifest()
    stats, part = planted()

    def crossed() -> str:
        figures = functional_figures(layers, man, stats, holdout=part)
        return with_functional(report_of(), figures, crossfit=True).to_json()

    text = crossed()
    assert text == crossed()
    report = Report.model_validate_json(text)
    assert report.notes == [CROSSFIT_NOTE]
    again = with_functional(
        report, functional_figures(layers, man, stats, holdout=part), crossfit=True
    )
    assert again.notes == [CROSSFIT_NOTE]  # said once
    noted = report_of().model_copy(update={"notes": ["no FLOPs"]})
    assert with_functional(noted, {"a": report.layers[0].functional}, crossfit=True).notes == [  # type: ignore[dict-item]
        "no FLOPs",
        CROSSFIT_NOTE,
    ]
    assert with_functional(noted, {}, crossfit=True) == noted  # no figures: nothing to say


def test_held_out_statistics_that_do_not_fit_are_refused() -> None:
    man, layers = tiny_manifest()
    stats, part = planted()
    with pytest.raises(InvalidInputError, match="no held-out statistics for fc"):
        functional_figures(layers, man, stats, holdout={"b": part["b"]})
    with pytest.raises(InvalidInputError, match="not a part of its statistics"):
        functional_figures(layers, man, part, holdout=stats)  # the whole as the part
    with pytest.raises(InvalidInputError, match="shape"):
        functional_figures(layers, man, stats, holdout={**part, "b": part["b"][:-1, :-1]})
