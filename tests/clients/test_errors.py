"""One exception tree under clients.ClientError, drawn in clients.errors' docstring."""

from __future__ import annotations

import re

import clients
import clients.errors


def public_exceptions() -> dict[str, type[BaseException]]:
    exported = {name: getattr(clients, name) for name in clients.__all__}
    return {
        name: obj
        for name, obj in exported.items()
        if isinstance(obj, type) and issubclass(obj, BaseException)
    }


def drawn_tree() -> dict[str, str | None]:
    """Class name -> its parent in the docstring's drawing (None for the root)."""
    parents: dict[str, str | None] = {}
    stack: list[tuple[int, str]] = []
    doc = clients.errors.__doc__ or ""
    for line in doc.splitlines():
        match = re.match(r"^    ([ │├└─]*)(\w+Error)\b", line)
        if match is None:
            continue
        depth, name = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        parents[name] = stack[-1][1] if stack else None
        stack.append((depth, name))
    return parents


def test_every_public_exception_derives_from_client_error() -> None:
    found = public_exceptions()
    assert "ClientError" in found and len(found) == len(clients.errors.__all__)
    for name, cls in found.items():
        assert issubclass(cls, clients.ClientError), name
        assert cls is getattr(clients.errors, name), name  # one definition, in clients.errors


def test_the_drawn_tree_is_the_class_hierarchy() -> None:
    parents = drawn_tree()
    assert set(parents) == set(clients.errors.__all__)
    for name, parent in parents.items():
        cls = getattr(clients.errors, name)
        in_tree = [b for b in cls.__bases__ if issubclass(b, clients.ClientError)]
        if parent is None:
            assert cls is clients.ClientError and in_tree == []
        else:
            assert [b.__name__ for b in in_tree] == [parent], name


def test_standard_bases_are_kept_for_existing_handlers() -> None:
    assert issubclass(clients.ManifestError, ValueError)
    assert issubclass(clients.JobTimeoutError, TimeoutError)
    assert issubclass(clients.PlanMismatchError, clients.PlanError)
    assert issubclass(clients.TooManyRequestsError, clients.PruneGraphHTTPError)
    assert issubclass(clients.PruneGraphHTTPError, clients.PruneGraphClientError)
