"""Apply the compensated plan (its sidecar is found next to it) and compare with the original."""

import copy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import fidelity as fid  # type: ignore[import-not-found]  # noqa: E402

from clients import apply_plan  # noqa: E402

model = fid.setup(fid.realdata_dir()).model
evaluation = fid.image_set(None, 1).eval_u8  # 292 crops of 12 other images
ref = fid.log_probs(copy.deepcopy(model), evaluation)
pruned = apply_plan(copy.deepcopy(model), "plan.json", torch.zeros(1, 3, 224, 224))
lp = fid.log_probs(pruned, evaluation)
agreement = (lp.argmax(1) == ref.argmax(1)).double().mean()
print(f"top-1 agreement with the unpruned model: {agreement:.3f}")
