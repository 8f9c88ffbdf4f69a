"""Held-out statistics in an activations file (service.ingest.statistics.read_holdout): read when
they are a strict part of the statistics of every consumer, refused with a hint otherwise;
files without them (version 2, or version 3 captured with holdout_every=0) read as before."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from graphs.contracts.activations import gram_key, holdout_key, metadata
from graphs.errors import CheckpointError, InvalidInputError
from graphs.layers import LayerWeights
from service.ingest.activations import Capture, check_capture, read_capture
from service.ingest.statistics import read_holdout, read_statistics


def _gram(rows: np.ndarray) -> np.ndarray:
    z = np.hstack([rows, np.ones((rows.shape[0], 1))])
    return z.T @ z


def _pair(c: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(S of 40 rows, S of its last 15 rows)."""
    rows = np.random.default_rng(seed).standard_normal((40, c)) + 0.5
    return _gram(rows), _gram(rows[25:])


def _tensors() -> dict[str, np.ndarray]:
    (s1, h1), (s2, h2) = _pair(3, 0), _pair(4, 1)
    return {gram_key("a"): s1, holdout_key("a"): h1, gram_key("b"): s2, holdout_key("b"): h2}


def _read(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return read_holdout(tensors, read_statistics(tensors, "f"), "f")


def test_strict_parts_are_read_bit_for_bit() -> None:
    tensors = _tensors()
    held = _read(tensors)
    assert set(held) == {"a", "b"}
    for name, h in held.items():
        assert h.dtype == np.float64 and np.array_equal(h, tensors[holdout_key(name)])
    plain = {k: v for k, v in tensors.items() if k.startswith("gram/")}
    assert _read(plain) == {}  # no held-out statistics: nothing to cross-fit, no error


def _bad_cases() -> dict[str, tuple[dict[str, np.ndarray], str]]:
    t = _tensors()
    s, h = t[gram_key("a")], t[holdout_key("a")]
    nan, skew = h.copy(), h.copy()
    nan[0, 1] = nan[1, 0] = np.nan
    skew[0, 1] += 1.0
    inflated = h.copy()
    inflated[0, 0] = s[0, 0] + 1.0  # more of channel 0's energy than all the rows have
    no_gram = {k: v for k, v in t.items() if k != gram_key("a")}
    return {
        "missing gram": (no_gram, "come without statistics of all the data (no tensor 'gram/a')"),
        "wrong shape": (
            {**t, holdout_key("a"): np.ascontiguousarray(h[1:, 1:])},
            "have shape [3, 3], its statistics",
        ),
        "nan": ({**t, holdout_key("a"): nan}, "held-out statistics of 'a' contain NaN"),
        "asymmetric": ({**t, holdout_key("a"): skew}, "held-out statistics of 'a' are not sym"),
        "no rows": ({**t, holdout_key("a"): h * 0}, "no rows"),
        "all rows": (
            {**t, holdout_key("a"): s},
            "are not a part of its statistics (rows 40 of 40)",
        ),
        "more rows": ({**t, holdout_key("a"): s + h}, "are not a part of its statistics"),
        "diagonal": ({**t, holdout_key("a"): inflated}, "are not a part of its statistics"),
        "some consumers": (
            {k: v for k, v in t.items() if k != holdout_key("b")},
            "held-out statistics for 1 of 2 consumers; none for b",
        ),
    }


@pytest.mark.parametrize("case", sorted(_bad_cases()))
def test_bad_held_out_statistics_are_refused_with_a_hint(case: str, tmp_path: Path) -> None:
    tensors, words = _bad_cases()[case]
    with pytest.raises(CheckpointError, match=re.escape(words)) as e:
        _read(tensors)
    assert "capture" in e.value.hint.lower()
    path = tmp_path / "bad.safetensors"
    meta = metadata(layers={}, sources={}, shapes={}, seed=0, skipped={}, samples=40,
                    holdout_samples=15)  # fmt: skip
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match=re.escape(words)) as e:
        read_capture(path, name="upload")
    assert str(e.value).startswith("upload: ") and "capture" in e.value.hint.lower()


def test_version_2_and_3_files_without_held_out_statistics_read_as_before(tmp_path: Path) -> None:
    t = {k: v for k, v in _tensors().items() if k.startswith("gram/")}
    for version in ("2", "3"):
        path = tmp_path / f"v{version}.safetensors"
        meta = metadata(layers={}, sources={}, shapes={}, seed=0, skipped={}, samples=40)
        save_file(t, str(path), metadata={**meta, "version": version})
        capture = read_capture(path)
        assert capture.holdout == {} and capture.holdout_samples == 0 and capture.samples == 40
        assert set(capture.statistics) == {"a", "b"}
    path = tmp_path / "h.safetensors"
    meta = metadata(layers={}, sources={}, shapes={}, seed=0, skipped={}, samples=40,
                    holdout_samples=15)  # fmt: skip
    save_file(_tensors(), str(path), metadata=meta)
    capture = read_capture(path)
    assert set(capture.holdout) == {"a", "b"} and capture.holdout_samples == 15


def test_check_capture_checks_held_out_names_against_the_layers() -> None:
    t = _tensors()
    stats, held = read_statistics(t, "f"), _read(t)
    rng = np.random.default_rng(0)
    layers = [
        LayerWeights(name="a", weight=rng.standard_normal((5, 3)), kind="linear"),
        LayerWeights(name="b", weight=rng.standard_normal((6, 4)), kind="linear"),
    ]
    check_capture(Capture({}, stats, {}, 40, held, 15), layers)
    with pytest.raises(InvalidInputError, match="does not have as conv/linear layers: z"):
        check_capture(Capture({}, stats, {}, 40, {**held, "z": held["a"]}, 15), layers)


@pytest.mark.parametrize("version", ["1", "2"])
def test_held_out_statistics_in_a_version_1_or_2_file_are_refused(
    version: str, tmp_path: Path
) -> None:
    """Version 3 introduced ``holdout/`` tensors: an older file holding them is not one the
    writer made (and readers of that version would ignore them)."""
    meta = metadata(layers={}, sources={}, shapes={}, seed=0, skipped={}, samples=40,
                    holdout_samples=15)  # fmt: skip
    old = {**meta, "version": version}
    if version == "1":
        del old["version"]  # a file without a version is version 1
    path = tmp_path / f"v{version}.safetensors"
    save_file(_tensors(), str(path), metadata=old)
    words = f"claims version {version} but holds held-out statistics"
    with pytest.raises(CheckpointError, match=words + r".*which version 3 introduced") as e:
        read_capture(path, name="upload")
    assert str(e.value).startswith("upload ") and "clients.capture_activations" in e.value.hint
    save_file(_tensors(), str(path), metadata={**meta, "version": "3"})
    assert set(read_capture(path).holdout) == {"a", "b"}  # the same tensors as version 3: read
