"""The params/MACs model (graphs.cost)."""

from __future__ import annotations

import pytest

from graphs.cost import CostModel
from tests.graphs.chain import tiny_manifest


def test_exact_cost_model_from_a_manifest() -> None:
    man, _ = tiny_manifest()
    cost = CostModel.from_manifest(man)
    kept = {0: 5, 1: 4, 2: 4}
    params = 5 * 27 + 5 + 5 + 5 + 4 * 5 * 9 + 4 + 4 * 16 + 4
    assert cost.params(kept) == params
    macs = 5 * 27 * 16 + 4 * 5 * 9 * 4 + 4 * 16 + 100
    assert cost.macs(kept) == macs
    assert cost.shapes(kept)["fc.weight"] == [4, 16]
    dp, dm = cost.delta({0: 8, 1: 6, 2: 4}, 1, 4)
    assert dp == cost.params({0: 8, 1: 4, 2: 4}) - cost.params({0: 8, 1: 6, 2: 4})
    assert dm == pytest.approx(cost.macs({0: 8, 1: 4, 2: 4}) - cost.macs({0: 8, 1: 6, 2: 4}))
