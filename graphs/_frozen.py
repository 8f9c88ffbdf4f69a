"""The base of every versioned, frozen pydantic model of prunegraph (reports, manifests, plans)."""

from pydantic import BaseModel, ConfigDict


class Frozen(BaseModel):
    """Immutable, and unknown fields are errors (a typo in a plan or manifest never passes)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
