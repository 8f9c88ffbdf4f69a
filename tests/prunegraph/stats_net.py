"""The small seeded conv net of the compensated-plan CLI tests, saved with its manifest."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from clients.manifest import build_manifest
from graphs.manifest import Manifest


class Net(nn.Module):
    """stem (kept) → a (12 channels) → b (12 channels) → flatten → fc (classifier)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 12, 3, padding=1)
        self.b = nn.Conv2d(12, 12, 3, padding=1)
        self.fc = nn.Linear(12 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.a(x))
        x = torch.relu(self.b(x))
        return self.fc(torch.flatten(x, 1))


def save_net(root: Path) -> tuple[Net, Manifest]:
    """A Net from seed 0 (eval mode) saved as ``root/net.pt``, its manifest (inputs 1×3×4×4)
    as ``root/manifest.json``."""
    torch.manual_seed(0)
    net = Net().eval()
    torch.save(net.state_dict(), root / "net.pt")
    manifest = build_manifest(net, torch.zeros(1, 3, 4, 4))
    (root / "manifest.json").write_text(manifest.model_dump_json())
    return net, manifest
