"""Fuzzing the HTTP API: no request, however malformed, ever gets a 5xx.

- Schema fuzzing with schemathesis: every operation of the real app's OpenAPI spec gets valid and
  invalid requests (bodies, path parameters, media types, methods), with and without a valid
  bearer token. Half the generated job requests name a real checkpoint, and half the generated
  job ids a real job, so the handlers behind the 404s run too.
- Authorization headers from hypothesis: 401 unless the token is exactly right, never 5xx.
- Mutated real checkpoints (PyTorch zip and legacy, safetensors, ONNX) with bytes flipped,
  inserted and cut off: stored (201) or refused with a 4xx JSON error, never 5xx.
- Forged safetensors headers, as checkpoints and as activations: shapes (overflowing products
  included), offsets and dtypes drawn by hypothesis, never 5xx.
- No error names a folder of the server (its data dir, the working dir).

Requests go through a Starlette ``TestClient`` that runs the app's lifespan (so
``app.state.pg`` exists) with ``raise_server_exceptions=False``: an unhandled exception comes
back as the 500 it would be in production, and schemathesis's ``not_a_server_error`` check
reports it with a curl line to reproduce it. Everything is derandomized.
"""

from __future__ import annotations

import io
import json
import math
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import schemathesis
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import save as save_safetensors
from schemathesis.checks import not_a_server_error

from service.main import create_app
from service.settings import Settings
from tests.service.helpers import model_bytes

TOKEN = "fuzz-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

# The spec does not depend on the settings, and create_app does nothing until its lifespan runs,
# so the schema can be read at import (schemathesis parametrizes at collection).
schema = schemathesis.openapi.from_dict(
    create_app(Settings(data_dir=Path("unused"), tokens=f"fuzzer:{TOKEN}")).openapi()
)

FUZZ = settings(
    max_examples=40,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)


class Server:
    """The app under test, with one real checkpoint and one real job of the fuzzing user."""

    def __init__(self, client: TestClient, data_dir: Path, checkpoint_id: str, job_id: str):
        self.client = client
        self.data_dir = data_dir
        self.checkpoint_id = checkpoint_id
        self.job_id = job_id


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("fuzz")
    # rate limits off: the fuzzing sends hundreds of bad tokens from one address on purpose
    cfg = Settings(
        data_dir=data_dir,
        workers=1,
        tokens=f"fuzzer:{TOKEN}",
        max_upload_bytes=1 << 20,
        rate_limit=0,
        auth_failure_limit=0,
    )
    with TestClient(create_app(cfg), raise_server_exceptions=False) as client:
        up = client.post("/v1/checkpoints", files={"file": ("m.pt", model_bytes())}, headers=AUTH)
        assert up.status_code == 201, up.text
        ckpt = up.json()["id"]
        job = client.post("/v1/jobs", json={"checkpoint_id": ckpt, "methods": ["l1"]}, headers=AUTH)
        assert job.status_code == 201, job.text
        yield Server(client, data_dir, ckpt, job.json()["id"])
    assert list((data_dir / "tmp").iterdir()) == []  # no upload left a temp file behind


def _no_server_path(server: Server, text: str) -> None:
    """An error names no folder of the server (its data dir, here under the temp dir)."""
    for root in {str(server.data_dir), str(server.data_dir.resolve()), str(Path.cwd())}:
        assert root not in text, text


def _coin(value: object) -> bool:
    """A deterministic half of the generated values."""
    return zlib.crc32(repr(value).encode()) % 2 == 0


def _aim(case: Any, server: Server) -> None:
    """Point half the cases at the real checkpoint and job (never deleting the checkpoint)."""
    job_id = case.path_parameters.get("job_id") if case.path_parameters else None
    if isinstance(job_id, str) and _coin(job_id):
        case.path_parameters["job_id"] = server.job_id
    body = case.body
    if (
        case.method.upper() == "POST"
        and case.operation.path == "/v1/jobs"
        and isinstance(body, dict)
        and isinstance(body.get("checkpoint_id"), str)
        and _coin(body)
    ):
        body["checkpoint_id"] = server.checkpoint_id


def _send(client: TestClient, case: Any, headers: dict[str, str]) -> Any:
    """Send a case through the TestClient as the exact bytes schemathesis would put on the wire.

    schemathesis serializes for ``requests`` (also bodies that break the schema, such as a
    multipart ``file`` that is a number), so ``requests`` prepares the request and the TestClient
    sends its method, URL, headers and body unchanged.
    """
    kw = case.as_transport_kwargs(base_url="http://testserver", headers=headers)
    kw.pop("auth", None)
    prepared = requests.Request(**kw).prepare()
    body = prepared.body.encode() if isinstance(prepared.body, str) else prepared.body
    request = client.build_request(
        str(prepared.method), str(prepared.url), headers=dict(prepared.headers), content=body
    )
    request.read()  # schemathesis reads the sent body back from the response's request
    return client.send(request)


@schema.parametrize()
@FUZZ
def test_no_server_errors_with_token(case: Any, server: Server) -> None:
    _aim(case, server)
    response = _send(server.client, case, AUTH)
    case.validate_response(response, checks=[not_a_server_error])


@schema.parametrize()
@FUZZ
def test_no_server_errors_without_token(case: Any, server: Server) -> None:
    _aim(case, server)
    response = _send(server.client, case, {})
    case.validate_response(response, checks=[not_a_server_error])


# ------------------------------------------------------------------------- Authorization header

_LATIN1 = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"))


@FUZZ
@given(
    scheme=st.sampled_from(["Bearer", "bearer", "BEARER", "Basic", "", "Bearer  "]),
    token=st.one_of(_LATIN1, st.just(TOKEN), st.builds(lambda s: f"{TOKEN}{s}", _LATIN1)),
)
def test_authorization_header_fuzz(server: Server, scheme: str, token: str) -> None:
    value = f"{scheme} {token}" if scheme else token
    r = server.client.get("/v1/jobs", headers={"Authorization": value.encode("latin-1")})
    ok = scheme.strip().lower() == "bearer" and token.strip() == TOKEN
    assert r.status_code == (200 if ok else 401), (value, r.text)
    if not ok:
        assert set(r.json()) == {"error", "hint"}


# ------------------------------------------------------------------------- mutated checkpoints


def _legacy_pt() -> bytes:
    buf = io.BytesIO()
    g = torch.Generator().manual_seed(1)
    sd = {"conv.weight": torch.randn(8, 3, 3, 3, generator=g), "fc.weight": torch.randn(4, 8)}
    torch.save(sd, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def _safetensors() -> bytes:
    rng = np.random.default_rng(0)
    return save_safetensors(
        {
            "conv.weight": rng.standard_normal((8, 3, 3, 3)).astype(np.float16),
            "bn.weight": np.ones(8, np.float32),
            "bn.running_var": np.ones(8, np.float32),
            "fc.weight": rng.standard_normal((4, 8)).astype(np.float32),
        }
    )


def _onnx() -> bytes:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "c.weight"),
        numpy_helper.from_array(rng.standard_normal((8, 1, 3, 3)).astype(np.float32), "dw.weight"),
        numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "fc.weight"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "c.weight"], ["y"], name="c"),
        helper.make_node("Relu", ["y"], ["r"]),
        helper.make_node("Conv", ["r", "dw.weight"], ["z"], name="dw", group=8),
        helper.make_node("GlobalAveragePool", ["z"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("MatMul", ["f", "fc.weight"], ["out"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph(nodes, "g", [x], [out], inits)
    return helper.make_model(graph).SerializeToString()


SEEDS = {
    "pt": model_bytes(),
    "legacy.pt": _legacy_pt(),
    "safetensors": _safetensors(),
    "onnx": _onnx(),
}

HEAD = 10  # bytes kept as they are: the format's magic (zip, pickle, safetensors length, ONNX)
# (relative position, byte, kind): kind 0 overwrites, 1 inserts, 2 deletes
_EDIT = st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255), st.integers(0, 2))


def _mutate(data: bytes, edits: list[tuple[float, int, int]], keep: float) -> bytes:
    """Edits past the first bytes (which only decide the format), then a cut at ``keep``."""
    out = bytearray(data)
    for where, byte, kind in edits:
        i = HEAD + int(where * (len(out) - HEAD))
        if kind == 0:
            out[i] = byte
        elif kind == 1:
            out.insert(i, byte)
        else:
            del out[i]
    return bytes(out[: max(HEAD, int(keep * len(out)))])


@pytest.mark.parametrize("fmt", sorted(SEEDS))
@FUZZ
@given(
    edits=st.lists(_EDIT, min_size=1, max_size=8),
    keep=st.one_of(st.just(1.0), st.floats(0, 1)),
)
def test_mutated_checkpoints_never_give_5xx(
    server: Server, fmt: str, edits: list[tuple[float, int, int]], keep: float
) -> None:
    data = _mutate(SEEDS[fmt], edits, keep)
    r = server.client.post("/v1/checkpoints", files={"file": (f"m.{fmt}", data)}, headers=AUTH)
    assert r.status_code == 201 or 400 <= r.status_code < 500, (r.status_code, r.text)
    if r.status_code != 201:
        assert set(r.json()) == {"error", "hint"} and r.json()["hint"], r.text
        assert "trusted source" not in r.text and "to `False`" not in r.text  # torch's advice
        _no_server_path(server, r.text)


# ------------------------------------------------------------------------- forged safetensors

_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I8": 1, "U8": 1, "BOOL": 1}
_DTYPES = st.sampled_from([*_ITEMSIZE, "F8_E4M3", "XX", ""])
# small dimensions, the largest accepted one, and beyond: overflowing products, negatives
_DIM = st.one_of(
    st.integers(1, 4),
    st.integers(0, 4),
    st.sampled_from([2**20, 2**40, 2**40 + 1, 2**63, 2**64 + 3, -1]),
)
# empty tensors whose other dimensions multiply past what numpy can index
_EMPTY = st.builds(
    lambda dims, at: [*dims[:at], 0, *dims[at:]],
    st.lists(st.sampled_from([3, 2**20, 2**40]), min_size=1, max_size=4),
    st.integers(0, 4),
)
_SHAPE = st.one_of(
    st.lists(st.integers(1, 4), min_size=2, max_size=2),  # linear
    st.lists(st.integers(1, 4), min_size=4, max_size=4),  # conv2d
    st.lists(_DIM, max_size=5),
    _EMPTY,
)
_OFFSET = st.one_of(st.integers(0, 96), st.sampled_from([-1, 2**40, 2**63, 2**64]))
_ENTRY = st.tuples(
    st.sampled_from(["conv1.weight", "conv2.weight", "fc.weight", "bn.weight", "x"]),
    _DTYPES,
    _SHAPE,
    st.one_of(st.none(), st.none(), st.tuples(_OFFSET, _OFFSET)),  # None: end to end, as written
)


def _forged_safetensors(entries: list[Any], tail: int, activations: bool, noise: bool) -> bytes:
    """A safetensors file with the header the entries declare and its data section.

    An entry without offsets gets the next ``prod(shape) * itemsize`` bytes (as a writer lays
    tensors out, capped at 4 KiB so huge shapes stay small files); ``tail`` extra bytes follow.
    The data are random bytes (NaNs and all) with ``noise``, else small finite numbers.
    """
    header: dict[str, Any] = {}
    at = 0
    for name, dtype, shape, offsets in entries:
        if offsets is None:
            size = min(math.prod(shape) * _ITEMSIZE.get(dtype, 1), 4096) if shape else 0
            offsets = (at, at + max(size, 0))
        at = max(at, offsets[1]) if 0 <= offsets[1] <= 4096 else at
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": list(offsets)}
    if activations:
        layers = {"conv1": "conv1.weight", "conv2": "conv2.weight", "fc": "fc.weight"}
        header["__metadata__"] = {"format": "prunegraph-activations", "layers": json.dumps(layers)}
    raw = json.dumps(header).encode()
    data = np.random.default_rng(len(raw)).integers(0, 256, at + tail, dtype=np.uint8)
    if not noise:  # 0x3c3c... is a small positive number in every float dtype
        data = (data & 0x03) | 0x3C
    return len(raw).to_bytes(8, "little") + raw + data.tobytes()


@pytest.mark.parametrize("target", ["checkpoint", "activations"])
@FUZZ
@given(
    entries=st.lists(_ENTRY, min_size=1, max_size=4), tail=st.integers(0, 8), noise=st.booleans()
)
def test_forged_safetensors_headers_never_give_5xx(
    server: Server, target: str, entries: list[Any], tail: int, noise: bool
) -> None:
    """Shapes, offsets and dtypes drawn freely (overflowing products such as
    [2**40, 2**40, 2**40, 0] included): stored or refused with a 4xx, never a 5xx."""
    data = _forged_safetensors(entries, tail, activations=target == "activations", noise=noise)
    url = "/v1/checkpoints"
    if target == "activations":
        url += f"/{server.checkpoint_id}/activations"
    r = server.client.post(url, files={"file": ("m.safetensors", data)}, headers=AUTH)
    assert r.status_code == 201 or 400 <= r.status_code < 500, (r.status_code, r.text)
    if r.status_code != 201:
        assert set(r.json()) == {"error", "hint"}, r.text
        _no_server_path(server, r.text)


@pytest.mark.parametrize("target", ["checkpoint", "activations"])
def test_overflowing_empty_shape_is_422(server: Server, target: str) -> None:
    """The shape of the report: [2**40, 2**40, 2**40, 0] has no elements, but numpy refuses to
    create it; the header check refuses it first, naming the tensor."""
    entry = ("conv1.weight", "F32", [2**40, 2**40, 2**40, 0], (0, 0))
    data = _forged_safetensors([entry], 0, activations=target == "activations", noise=False)
    url = "/v1/checkpoints"
    if target == "activations":
        url += f"/{server.checkpoint_id}/activations"
    r = server.client.post(url, files={"file": ("m.safetensors", data)}, headers=AUTH)
    assert r.status_code == 422, r.text
    assert "conv1.weight" in r.json()["error"] and "2**40" in r.json()["error"]
