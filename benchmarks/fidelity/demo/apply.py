"""Apply the compensated plan (its sidecar is found next to it) and compare with the original."""

import copy

import torch

from benchmarks.fidelity_harness import log_probs, setup
from benchmarks.fidelity_images import image_set
from benchmarks.support.paths import realdata_dir
from clients import apply_plan

model = setup(realdata_dir()).model
evaluation = image_set(None, 1).eval_u8  # 292 crops of 12 other images
ref = log_probs(copy.deepcopy(model), evaluation)
pruned = apply_plan(copy.deepcopy(model), "plan.json", torch.zeros(1, 3, 224, 224))
lp = log_probs(pruned, evaluation)
agreement = (lp.argmax(1) == ref.argmax(1)).double().mean()
print(f"top-1 agreement with the unpruned model: {agreement:.3f}")
