"""Client side: capture second moments on calibration images, write the manifest."""

from pathlib import Path

import torch

from benchmarks.fidelity_harness import setup
from benchmarks.fidelity_images import batches, image_set
from benchmarks.support.paths import realdata_dir
from clients import build_manifest, capture_activations

model = setup(realdata_dir()).model
calib = image_set(1, None).calib_u8  # 196 crops of 8 calibration images
acts = capture_activations(model, batches(calib), max_samples=len(calib), maps=False)
acts.save("calib.safetensors")
Path("manifest.json").write_text(
    build_manifest(model, torch.zeros(1, 3, 224, 224)).model_dump_json()
)
print(
    f"{len(acts.statistics)} consumers, {Path('calib.safetensors').stat().st_size / 2**20:.1f} MiB"
)
