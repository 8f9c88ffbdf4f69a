"""The fold contract: sidecar bytes, plan validation and the numpy reference of a fold."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from graphs.errors import InvalidInputError
from graphs.fold import (
    Compensation,
    ConsumerFold,
    decode_sidecar,
    encode_sidecar,
    fold_keys,
    fold_weight,
    sidecar_sha256,
)
from graphs.plan import Constraints, GroupPlan, PruningPlan, Target


def test_sidecar_round_trip_and_deterministic_bytes() -> None:
    rng = np.random.default_rng(0)
    arrays = {"z": rng.normal(size=(3, 4)), "a": rng.normal(size=5), "m": np.zeros((0, 2))}
    data = encode_sidecar(arrays)
    assert data == encode_sidecar(dict(reversed(list(arrays.items()))))
    back = decode_sidecar(data)
    assert sorted(back) == sorted(arrays)
    for k, v in arrays.items():
        assert back[k].dtype == np.float64
        np.testing.assert_array_equal(back[k], v)
    (n,) = np.frombuffer(data[:8], dtype="<u8")
    assert n % 8 == 0
    assert "__metadata__" not in json.loads(data[8 : 8 + int(n)])


def test_sidecar_is_readable_by_safetensors() -> None:
    st = pytest.importorskip("safetensors.numpy")
    arrays = {"fold/0/c/matrix": np.arange(6.0).reshape(2, 3), "fold/0/c/shift": np.ones(2)}
    loaded = st.load(encode_sidecar(arrays))
    for k, v in arrays.items():
        np.testing.assert_array_equal(loaded[k], v)
    back = decode_sidecar(st.save({k: v.astype(np.float32) for k, v in arrays.items()}))
    np.testing.assert_array_equal(back["fold/0/c/matrix"], arrays["fold/0/c/matrix"])


@pytest.mark.parametrize(
    "data",
    [b"", b"\x05\x00\x00\x00\x00\x00\x00\x00{", b"\x02\x00\x00\x00\x00\x00\x00\x00[]"],
)
def test_malformed_sidecar_is_a_clear_error(data: bytes) -> None:
    with pytest.raises(InvalidInputError, match="sidecar"):
        decode_sidecar(data)


def test_sidecar_with_wrong_sizes_is_refused() -> None:
    data = encode_sidecar({"a": np.ones(4)})
    with pytest.raises(InvalidInputError, match="offsets out of range"):
        decode_sidecar(data[:-8])


def test_encode_refuses_non_finite_and_bad_keys() -> None:
    with pytest.raises(InvalidInputError, match="NaN"):
        encode_sidecar({"a": np.array([np.nan])})
    with pytest.raises(InvalidInputError, match="tensor name"):
        encode_sidecar({"": np.ones(1)})


def _conv(x: np.ndarray, w: np.ndarray, bias: np.ndarray, groups: int = 1) -> np.ndarray:
    """Valid cross-correlation, x: (c, H, W), w: (out, c/groups, kh, kw) → (out, H', W')."""
    out, cin, kh, kw = w.shape
    h, wd = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    y = np.zeros((out, h, wd)) + bias[:, None, None]
    per_out = out // groups
    for o in range(out):
        g = o // per_out
        xs = x[g * cin : (g + 1) * cin]
        for i in range(kh):
            for j in range(kw):
                y[o] += np.einsum("c,chw->hw", w[o, :, i, j], xs[:, i : i + h, j : j + wd])
    return y


def _planted(
    rng: np.random.Generator, c: int, removed: list[int], kept: list[int], groups: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Channel maps where each removed channel is an exact affine combination of kept ones
    in its own conv group; returns x (c, 9, 9), B, b."""
    per = c // groups
    x = rng.normal(size=(c, 9, 9))
    B = np.zeros((len(removed), len(kept)))
    for i, r in enumerate(removed):
        same = [j for j, k in enumerate(kept) if k // per == r // per]
        B[i, same] = rng.normal(size=len(same))
    b = rng.normal(size=len(removed))
    x[removed] = np.einsum("rk,khw->rhw", B, x[kept]) + b[:, None, None]
    return x, B, b


@pytest.mark.parametrize(("k", "groups"), [(1, 1), (3, 1), (3, 2)])
def test_fold_of_exact_combinations_keeps_the_conv_output(k: int, groups: int) -> None:
    rng = np.random.default_rng(k + groups)
    c, removed = 8, [1, 6]
    kept = [i for i in range(c) if i not in removed]
    x, B, b = _planted(rng, c, removed, kept, groups)
    w = rng.normal(size=(6, c // groups, k, k))
    bias = rng.normal(size=6)
    y = _conv(x, w, bias, groups)
    w2, bias2 = fold_weight(w, bias, kept=kept, removed=removed, matrix=B, shift=b, groups=groups)
    # drop the removed channels' columns (and their maps) as pruning does
    x_k = x.copy()
    x_k[removed] = 0.0
    np.testing.assert_allclose(_conv(x_k, w2, bias2, groups), y, atol=1e-9)
    assert not np.allclose(_conv(x_k, w, bias, groups), y, atol=1e-3)


def test_fold_of_a_linear_after_flatten_keeps_its_output() -> None:
    rng = np.random.default_rng(3)
    c, p, removed = 5, 4, [0, 3]
    kept = [1, 2, 4]
    x, B, b = _planted(rng, c, removed, kept, 1)
    feats = x[:, :2, :2].reshape(c, p)  # (C, H·W): flatten order is channel-major
    w = rng.normal(size=(3, c * p))
    y = w @ feats.reshape(-1)
    w2, bias2 = fold_weight(w, None, kept=kept, removed=removed, matrix=B, shift=b, per_channel=p)
    f2 = feats.copy()
    f2[removed] = 0.0
    np.testing.assert_allclose(w2 @ f2.reshape(-1) + bias2, y, atol=1e-9)


def test_fold_shape_mismatch_is_an_error() -> None:
    with pytest.raises(InvalidInputError, match="do not match"):
        fold_weight(
            np.ones((2, 3)),
            None,
            kept=[0, 1],
            removed=[2],
            matrix=np.ones((1, 3)),
            shift=np.zeros(1),
        )


def _fold(**kw: object) -> ConsumerFold:
    m, s = fold_keys(0, "conv2")
    base: dict[str, object] = dict(
        group=0, consumer="conv2", weight="conv2.weight", bias=None, kept=[0, 2, 3],
        removed=[1], matrix=m, shift=s, predicted_error=0.01, kind="least_squares",
    )  # fmt: skip
    base.update(kw)
    return ConsumerFold.model_validate(base)


def _plan(comp: Compensation | None) -> PruningPlan:
    g = GroupPlan(
        id=0, name="conv1", producers=["conv1"], channels_before=4, channels_after=3,
        remove=[1], redundancy=None, rationale="test",
    )  # fmt: skip
    return PruningPlan(
        checkpoint_sha256=None, method="l1", target=Target(flops=0.1), constraints=Constraints(),
        seed=0, parameters={}, coupling="manifest", groups=[g], expected_shapes={},
        params_before=1, params_after=1, flops_before=None, flops_after=None, achieved={},
        rule="test", compensation=comp,
    )  # fmt: skip


def test_plan_without_compensation_has_no_field_and_with_it_round_trips() -> None:
    assert "compensation" not in _plan(None).to_json()
    comp = Compensation(sidecar_sha256=sidecar_sha256(b"x"), sidecar_bytes=1, folds=[_fold()])
    plan = _plan(comp)
    assert PruningPlan.model_validate_json(plan.to_json()) == plan


def test_plan_refuses_folds_that_do_not_match_its_groups() -> None:
    sha = sidecar_sha256(b"x")
    with pytest.raises(ValidationError, match="no group"):
        _plan(Compensation(sidecar_sha256=sha, sidecar_bytes=1, folds=[_fold(group=3)]))
    with pytest.raises(ValidationError, match="do not match"):
        _plan(
            Compensation(
                sidecar_sha256=sha, sidecar_bytes=1, folds=[_fold(kept=[0, 3], removed=[1])]
            )
        )
    with pytest.raises(ValidationError, match="overlap"):
        _fold(kept=[0, 1, 2], removed=[1])
    with pytest.raises(ValidationError, match="own sidecar keys"):
        Compensation(sidecar_sha256=sha, sidecar_bytes=1, folds=[_fold(), _fold(consumer="c3")])
