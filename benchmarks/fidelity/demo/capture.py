"""Client side: capture second moments on calibration images, write the manifest."""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import fidelity as fid  # type: ignore[import-not-found]  # noqa: E402

from clients import build_manifest, capture_activations  # noqa: E402

model = fid.setup(fid.realdata_dir()).model
calib = fid.image_set(1, None).calib_u8  # 196 crops of 8 calibration images
acts = capture_activations(model, fid.batches(calib), max_samples=len(calib), maps=False)
acts.save("calib.safetensors")
Path("manifest.json").write_text(
    build_manifest(model, torch.zeros(1, 3, 224, 224)).model_dump_json()
)
print(
    f"{len(acts.statistics)} consumers, {Path('calib.safetensors').stat().st_size / 2**20:.1f} MiB"
)
