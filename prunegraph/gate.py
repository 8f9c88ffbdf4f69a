"""The CI gate for model bloat: a report's redundancy against thresholds (``prunegraph check``).

Checks, for one graph method (mrp by default):

* ``max_redundancy``: the model's redundancy must not exceed it. The model's redundancy is the
  fraction of the model that removing every layer's redundant channels would remove
  (:mod:`graphs.removable`, the report's ``summary.methods[m].removable``): of its FLOPs when
  the report knows them (a manifest or ONNX), else of its parameters, counting the consumers'
  input slices and norm entries that go with the channels. (Before report schema 1.1 it was the
  params-weighted mean of per-layer redundancy, which a large non-redundant layer diluted: a
  model with every conv widened 2× by duplicated filters passed a 0.3 limit.) A failure names
  the layers whose redundant channels remove the most;
* ``max_layer_redundancy`` and ``layer_max`` (``{"features.*": 0.5}``, shell-style patterns, the
  last matching pattern wins): per-layer limits on each layer's own redundancy;
* ``max_growth`` with a baseline report: the model's redundancy may not grow by more than this.

Each check is a :class:`Check`; the gate passes when all pass. Thresholds come from
``[tool.prunegraph.check]`` in pyproject.toml (found from the working directory upwards) and
the command's flags, which win.
"""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path
from typing import Literal
from xml.etree import ElementTree as ET

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from graphs import InvalidInputError, Report
from graphs.report import Removal

GRAPH_METHODS = ("mrp", "srr", "hsc")


class CheckConfig(BaseModel):
    """Thresholds of the gate; the keys of ``[tool.prunegraph.check]`` (dashes or underscores)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    method: Literal["mrp", "srr", "hsc"] = "mrp"
    max_redundancy: float | None = Field(None, ge=0, le=1, alias="max-redundancy")
    max_layer_redundancy: float | None = Field(None, ge=0, le=1, alias="max-layer-redundancy")
    layer_max: dict[str, float] = Field(default_factory=dict, alias="layer-max")
    max_growth: float | None = Field(None, ge=0, le=1, alias="max-growth")


class Check(BaseModel):
    name: str
    value: float
    limit: float
    passed: bool
    message: str


class CheckResult(BaseModel):
    passed: bool
    method: str
    weighting: str | None = Field(
        description="flops or params: what the model's redundancy is a fraction of"
    )
    redundancy: float | None = Field(
        description="the model's removable fraction (see the module); null when only "
        "per-layer limits were checked on a report without it"
    )
    checks: list[Check]


def find_config(start: Path) -> tuple[CheckConfig, Path | None]:
    """``[tool.prunegraph.check]`` of the nearest pyproject.toml at or above ``start``."""
    for folder in (start.resolve(), *start.resolve().parents):
        path = folder / "pyproject.toml"
        if path.is_file():
            try:
                data = tomllib.loads(path.read_text(encoding="utf-8"))
            except (OSError, tomllib.TOMLDecodeError) as e:
                raise InvalidInputError(f"cannot read {path}: {e}", hint="Fix the file.") from None
            section = data.get("tool", {}).get("prunegraph", {}).get("check")
            if section is None:
                return CheckConfig(), None
            return parse_config(section, str(path)), path
    return CheckConfig(), None


def parse_config(section: object, where: str) -> CheckConfig:
    try:
        return CheckConfig.model_validate(section)
    except ValidationError as e:
        first = e.errors()[0]
        at = ".".join(map(str, first["loc"])) or "section"
        raise InvalidInputError(
            f"[tool.prunegraph.check] in {where}: {at}: {first['msg']}",
            hint="Keys: method, max-redundancy, max-layer-redundancy, layer-max, max-growth.",
        ) from None


def parse_layer_max(items: list[str]) -> dict[str, float]:
    """``PATTERN=VALUE`` flags as a dict (in order)."""
    out: dict[str, float] = {}
    for item in items:
        pattern, sep, value = item.rpartition("=")
        try:
            limit = float(value)
        except ValueError:
            limit = -1.0
        if not sep or not pattern or not 0 <= limit <= 1:
            raise InvalidInputError(
                f"--layer-max {item!r} is not PATTERN=VALUE with VALUE in [0, 1]",
                hint="For example --layer-max 'features.*=0.5'.",
            )
        out[pattern] = limit
    return out


def _removal(report: Report, method: str) -> Removal:
    summary = report.summary.methods.get(method)
    if summary is None or summary.redundancy_params_weighted is None:
        raise InvalidInputError(
            f"the report has no {method} redundancy",
            hint=f"Check with a graph method ({', '.join(GRAPH_METHODS)}) the report includes.",
        )
    if summary.removable is None:
        raise InvalidInputError(
            f"the report (schema {report.schema_version}) predates the model's removable "
            "fraction that --max-redundancy and --max-growth check",
            hint="Analyse the checkpoint again with this prunegraph (or pass the checkpoint "
            "itself instead of the old report).",
        )
    return summary.removable


def _model_redundancy(report: Report, method: str) -> tuple[float, str]:
    """The model's removable fraction: of FLOPs when the report knows them, else of params."""
    removal = _removal(report, method)
    if removal.flops is not None:
        return removal.flops, "flops"
    return removal.params, "params"


def _largest(removal: Removal, weighting: str | None, n: int = 3) -> str:
    """The layers whose redundant channels remove the most, with their share."""
    what = "FLOPs" if weighting == "flops" else "params"
    return (
        ", ".join(
            f"{r.name} ({r.channels} redundant channels: "
            f"{r.flops if r.flops is not None else r.params:.3f} of {what})"
            for r in removal.largest[:n]
        )
        or "none"
    )


def _layer_limit(name: str, config: CheckConfig) -> float | None:
    limit = config.max_layer_redundancy
    for pattern, value in config.layer_max.items():
        if fnmatch.fnmatchcase(name, pattern):
            limit = value
    return limit


def evaluate(report: Report, config: CheckConfig, baseline: Report | None = None) -> CheckResult:
    """Every configured check on ``report`` (and its growth since ``baseline``)."""
    method = config.method
    if method not in report.methods:
        raise InvalidInputError(
            f"the report has no method {method!r} (it has {', '.join(report.methods)})",
            hint="Analyse with that method, or pass --method.",
        )
    growth_check = baseline is not None and config.max_growth is not None
    summary = report.summary.methods.get(method)
    if config.max_redundancy is not None or growth_check or (summary and summary.removable):
        value, weighting = _model_redundancy(report, method)
    else:  # per-layer limits only: an old report without the removable fraction will do
        value, weighting = None, None
    what = "FLOPs" if weighting == "flops" else "parameters"
    checks: list[Check] = []
    if config.max_redundancy is not None and value is not None:
        ok = value <= config.max_redundancy + 1e-12
        checks.append(Check(
            name=f"model {method} redundancy (removable fraction of {what})",
            value=value, limit=config.max_redundancy, passed=ok,
            message=f"{method}: removing the redundant channels would remove {value:.3f} of the "
            f"model's {what}, which "
            + ("is within" if ok else f"exceeds by {value - config.max_redundancy:.3f}")
            + f" the limit {config.max_redundancy:.3f}; removing most: "
            + _largest(_removal(report, method), weighting),
        ))  # fmt: skip
    for layer in report.layers:
        limit = _layer_limit(layer.name, config)
        red = layer.methods[method].redundancy
        if limit is None or red is None:
            continue
        ok = red <= limit + 1e-12
        checks.append(Check(
            name=f"layer {layer.name}", value=red, limit=limit, passed=ok,
            message=f"layer {layer.name}: {method} redundancy {red:.3f} "
            + ("within" if ok else f"exceeds by {red - limit:.3f}") + f" the limit {limit:.3f}",
        ))  # fmt: skip
    if baseline is not None and config.max_growth is not None and value is not None:
        now, (before, base_weighting) = value, _model_redundancy(baseline, method)
        if base_weighting != weighting:  # only one knows FLOPs: compare fractions of params
            now, before = _removal(report, method).params, _removal(baseline, method).params
        growth = now - before
        ok = growth <= config.max_growth + 1e-12
        grew = _growth_by_layer(report, baseline, method)
        checks.append(Check(
            name=f"growth of {method} redundancy since the baseline", value=growth,
            limit=config.max_growth, passed=ok,
            message=f"{method} redundancy (removable fraction) {before:.3f} → {now:.3f} "
            f"(growth {growth:+.3f}, limit {config.max_growth:.3f}); grew most: {grew}",
        ))  # fmt: skip
    if not checks:
        raise InvalidInputError(
            "no threshold to check",
            hint="Pass --max-redundancy (or --layer-max, --max-growth with --baseline), or set "
            "them in [tool.prunegraph.check] of pyproject.toml.",
        )
    return CheckResult(
        passed=all(c.passed for c in checks),
        method=method,
        weighting=weighting,
        redundancy=value,
        checks=checks,
    )


def _growth_by_layer(report: Report, baseline: Report, method: str, n: int = 3) -> str:
    before = {lay.name: lay.methods[method].redundancy or 0.0 for lay in baseline.layers
              if method in lay.methods}  # fmt: skip
    deltas = sorted(
        ((lay.methods[method].redundancy or 0.0) - before[lay.name], lay.name)
        for lay in report.layers
        if lay.name in before
    )
    top = [(d, name) for d, name in reversed(deltas) if d > 0][:n]
    return ", ".join(f"{name} {d:+.3f}" for d, name in top) or "no layer"


def junit_xml(result: CheckResult, suite: str = "prunegraph.check") -> str:
    """The checks as JUnit XML (one testsuite, a testcase per check, failures with messages)."""
    failures = sum(not c.passed for c in result.checks)
    root = ET.Element("testsuites", tests=str(len(result.checks)), failures=str(failures))
    ts = ET.SubElement(
        root, "testsuite", name=suite, tests=str(len(result.checks)), failures=str(failures),
        errors="0", skipped="0",
    )  # fmt: skip
    for c in result.checks:
        case = ET.SubElement(ts, "testcase", classname=suite, name=c.name)
        if not c.passed:
            fail = ET.SubElement(case, "failure", message=c.message, type="threshold")
            fail.text = f"value {c.value:.6f} > limit {c.limit:.6f}"
        else:
            ET.SubElement(case, "system-out").text = c.message
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
