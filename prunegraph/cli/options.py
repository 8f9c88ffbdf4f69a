"""The options several commands share: their typer declarations and their parsing.

Parsing errors are :class:`graphs.InvalidInputError` naming the option, raised before any work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from graphs import AnalysisOptions, InvalidInputError
from graphs.contracts.activations import has_maps
from graphs.features import Activations
from graphs.manifest import Manifest

ServerOpt = Annotated[
    str | None,
    typer.Option(
        help="URL of a prunegraph service to compute on (same output as embedded)",
        envvar="PRUNEGRAPH_SERVER",
    ),
]
AlphaOpt = Annotated[float, typer.Option(help="null edge rate per layer")]
MinExplainedOpt = Annotated[
    float, typer.Option(help="least cos² between filters joined as redundant (0 = any)")
]
ManifestOpt = Annotated[Path | None, typer.Option(help="manifest JSON: coupling groups and FLOPs")]
ActivationsOpt = Annotated[
    Path | None,
    typer.Option(
        help="feature maps (clients.capture_activations(...).save): for ci and --vectors "
        "activations"
    ),
]
VectorsOpt = Annotated[
    str,
    typer.Option(
        help="what the graph methods compare: weights, activations, or auto (activations when "
        "--activations is given, else weights)"
    ),
]
EpsilonOpt = Annotated[
    float,
    typer.Option(
        help="functional redundancy: the relative consumer-output error allowed (with "
        "second-moment statistics in --activations)",
        min=0.0,
    ),
]
SensitivityOpt = Annotated[
    Path | None,
    typer.Option(
        help="a sensitivity table (JSON of clients.sensitivity(..., order='functional', "
        "compensation=(True,)), measured cross-fitted): its per-group weights price the marginal "
        "allocation of a compensated plan (needs --activations; implies --allocation marginal)",
        show_default=False,
    ),
]
HoldoutOpt = Annotated[
    Path | None,
    typer.Option(
        help="second-moment statistics of a part of the calibration data of --activations "
        "(clients.capture_activations(model, part_of_the_batches, maps=False).save(...), best "
        "whole source images): the error curves of the compensated plan are cross-fitted (folds "
        "fitted on one part, their error measured on the other), which predicts the harm of "
        "pruning better; planning takes about 1.6x longer (needs --activations; wins over the "
        "held-out statistics --activations may hold itself; with --no-compensation: the same "
        "channels, no folds)",
        show_default=False,
    ),
]
CrossfitOpt = Annotated[
    bool,
    typer.Option(
        "--crossfit/--no-crossfit",
        help="with held-out statistics in --activations (captured with "
        "clients.capture_activations(..., holdout_every=...)): cross-fit the error curves of "
        "compensated plans and of functional redundancy (folds fitted on one part of the "
        "calibration data, their error measured on the other); --no-crossfit: in-sample",
    ),
]
TokenOpt = Annotated[
    str | None,
    typer.Option(help="bearer token for --server", envvar="PRUNEGRAPH_TOKEN", show_default=False),
]
InputShapeOpt = Annotated[
    str | None,
    typer.Option(
        help="ONNX: the input shape that makes symbolic dims concrete, for FLOPs and a manifest, "
        "e.g. 1,3,64,256 (inputs separated by ';')",
        show_default=False,
    ),
]
SeedOpt = Annotated[int, typer.Option(min=0, max=2**32 - 1)]


def analysis_options(**values: float | str) -> AnalysisOptions:
    """The methods' parameters; an invalid one is a usage error naming its flag."""
    try:
        return AnalysisOptions(**values)
    except ValidationError as e:
        problems = "; ".join(f"--{'-'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise InvalidInputError(
            f"invalid option: {problems}".replace("_", "-"), hint="Check the command's options."
        ) from None


def parse_methods(methods: str) -> list[str]:
    """``--methods a,b``: the names in order, blanks dropped."""
    return [m.strip() for m in methods.split(",") if m.strip()]


def choose_vectors(vectors: str, activations: Path | None) -> str:
    """``--vectors auto``: the feature maps when they are given (they find far more redundancy
    than weights, benchmarks/RESULTS.md, issue 7), else the weights."""
    if vectors != "auto":
        return vectors
    return "activations" if activations is not None and has_maps(activations) else "weights"


def maps_given(activations: Path | None) -> Activations | None:
    """What ``check_features`` needs to know: whether feature maps were given."""
    return {} if activations is not None and has_maps(activations) else None


def existing(path: Path) -> Path:
    """A file to read or upload; refused before any work when it is not there."""
    if not path.is_file():
        raise InvalidInputError(f"{path} not found or not a file", hint="Check the path.")
    return path


def load_manifest(path: Path | None) -> Manifest | None:
    """``--manifest``: the file as a :class:`graphs.manifest.Manifest`; None when not given."""
    if path is None:
        return None
    try:
        return Manifest.model_validate_json(path.read_bytes())
    except OSError as e:
        raise InvalidInputError(
            f"cannot read the manifest {path}: {e.strerror or e}", hint="Check the path."
        ) from None
    except ValidationError as e:
        first = e.errors()[0]
        raise InvalidInputError(
            f"{path} is not a valid prunegraph manifest: {first['msg']} at "
            f"{'.'.join(map(str, first['loc'])) or 'top level'}",
            hint="Build one with `prunegraph manifest --model pkg.module:factory "
            "--input-shape 1,3,224,224 -o manifest.json`.",
        ) from None


def input_shapes(text: str | None, manifest: Path | None) -> list[list[int]] | None:
    """``--input-shape`` parsed (inputs separated by ';'); None when not given."""
    if text is None:
        return None
    if manifest is not None:
        raise InvalidInputError(
            "--input-shape and --manifest both give shapes", hint="Pass only one of them."
        )
    from service.ingest.onnx_shapes import parse_input_shapes

    return parse_input_shapes(text)
