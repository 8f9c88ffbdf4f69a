"""Method parameters and the checks made before any work (graphs.options)."""

from __future__ import annotations

import numpy as np
import pytest

from graphs import InvalidInputError
from graphs.options import (
    AnalysisOptions,
    check_features,
    check_inputs,
    check_methods,
    layer_seed,
)
from graphs.report import DATA_METHODS, METHODS


def test_methods_come_back_deduplicated_in_canonical_order() -> None:
    chosen = check_methods([*reversed(METHODS), METHODS[0]])
    assert chosen == list(METHODS)
    assert check_methods(["l1", "mrp"]) == [m for m in METHODS if m in {"l1", "mrp"}]


@pytest.mark.parametrize("methods", [[], ["nope"], ["mrp", "nope"]])
def test_unknown_or_missing_methods_are_refused(methods: list[str]) -> None:
    with pytest.raises(InvalidInputError, match="unknown or missing methods") as info:
        check_methods(methods)
    assert all(m in info.value.hint for m in METHODS)


def test_what_needs_feature_maps_is_refused_without_them() -> None:
    maps = {"conv": np.zeros((1, 2, 3))}
    for method in DATA_METHODS:
        with pytest.raises(InvalidInputError, match=f"{method} need feature maps"):
            check_features([method], AnalysisOptions(), None)
        check_features([method], AnalysisOptions(), maps)
    activations = AnalysisOptions(vectors="activations")
    with pytest.raises(InvalidInputError, match="vectors=activations need feature maps"):
        check_features(["mrp"], activations, None)
    check_features(["mrp", "l1"], AnalysisOptions(), None)  # weights only: nothing needed


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_seeds_outside_32_bits_are_refused(seed: int) -> None:
    with pytest.raises(InvalidInputError, match="seed"):
        check_inputs(["l1"], seed, None, None)


def test_inputs_default_their_options() -> None:
    chosen, opts = check_inputs(["srr", "mrp"], 0, None, None)
    assert chosen == ["mrp", "srr"] and opts == AnalysisOptions()


def test_parameters_are_the_methods_own() -> None:
    opts = AnalysisOptions(vectors="activations")
    assert set(opts.parameters("mrp")) == {"alpha", "min_explained", "vectors", "resolution"}
    assert set(opts.parameters("srr")) == {"alpha", "min_explained", "vectors"}
    assert set(opts.parameters("hsc")) >= {"k", "n_rounds"}
    assert opts.parameters("l1") == {} and "vectors" not in AnalysisOptions().parameters("srr")


def test_layer_seeds_depend_on_the_seed_and_the_name_only() -> None:
    assert layer_seed(3, "a") == layer_seed(3, "a")
    seeds = {layer_seed(s, n) for s in range(4) for n in ("a", "b", "conv1")}
    assert len(seeds) == 12 and all(0 <= s < 2**31 for s in seeds)
