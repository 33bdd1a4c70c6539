"""The retrieval network: a small residual CNN with an embedding, label heads and
structured hash-code heads.

Outputs of :class:`RetrievalNet` (a dict of tensors):

- ``features``: (N, D) L2-normalised embedding, ordered within a class by an
  instance-level loss and grouped by label by a supervised-contrastive one;
- ``<head>``: (N, classes) logits of each label head (:data:`~.data.LABELS`);
- ``code_<head>``: (N, bits) logits of that head's sub-code, trained towards a
  per-class hash centre (central similarity quantisation, Yuan et al. 2020);
- ``level``: (N,) position along the body axis in units of 100 mm, up to an offset
  per volume (body-part regression: trained on differences within a volume only);
- ``<aux head>``: logits of the training-only heads (:data:`~.data.AUX_LABELS`: plane, organ).

The ``appearance`` sub-code is not a head: it is an ITQ rotation of ``features``
fitted after training (:mod:`.itq`) and added by the export wrapper.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or 1x1) shortcut."""

    def __init__(self, inputs: int, outputs: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut = nn.Sequential()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride=stride, bias=False), nn.BatchNorm2d(outputs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class RetrievalNet(nn.Module):
    """ResNet-style backbone: a stem to quarter resolution, four stages of basic blocks."""

    def __init__(
        self,
        head_sizes: dict[str, int],
        sub_code_bits: dict[str, int],
        widths: tuple[int, int, int, int] = (32, 64, 128, 256),
        embedding_dim: int = 256,
        blocks: tuple[int, int, int, int] = (1, 1, 2, 2),
        aux_sizes: dict[str, int] | None = None,
    ):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, widths[0], 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        stages, inputs = [], widths[0]
        for i, (width, count) in enumerate(zip(widths, blocks, strict=True)):
            stride = 1 if i == 0 else 2
            repeats = [BasicBlock(width, width, 1) for _ in range(count - 1)]
            stages.append(nn.Sequential(BasicBlock(inputs, width, stride), *repeats))
            inputs = width
        self.stages = nn.Sequential(*stages)
        self.embedding = nn.Sequential(nn.Linear(inputs, 512), nn.ReLU(inplace=True), nn.Linear(512, embedding_dim))
        self.heads = nn.ModuleDict({name: nn.Linear(inputs, size) for name, size in head_sizes.items()})
        self.code_heads = nn.ModuleDict({name: nn.Linear(inputs, bits) for name, bits in sub_code_bits.items()})
        self.aux_heads = nn.ModuleDict({name: nn.Linear(inputs, size) for name, size in (aux_sizes or {}).items()})
        self.level = nn.Sequential(nn.Linear(inputs, 128), nn.ReLU(inplace=True), nn.Linear(128, 1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = self.stages(self.stem(x)).mean(dim=(2, 3))
        out = {"features": F.normalize(self.embedding(pooled), dim=1)}
        out.update({name: head(pooled) for name, head in self.heads.items()})
        out.update({f"code_{name}": head(pooled) for name, head in self.code_heads.items()})
        out.update({name: head(pooled) for name, head in self.aux_heads.items()})
        out["level"] = self.level(pooled)[:, 0]
        return out


def hash_centres(classes: int, bits: int, seed: int = 0) -> torch.Tensor:
    """(classes, bits) targets in {0, 1}, far apart in Hamming distance: rows of a
    Sylvester-Hadamard matrix (distance bits/2) where enough exist, else random."""
    size = 1
    while size < bits:
        size *= 2
    hadamard = torch.ones(1, 1)
    while hadamard.shape[0] < size:
        hadamard = torch.cat([torch.cat([hadamard, hadamard], 1), torch.cat([hadamard, -hadamard], 1)], 0)
    rows = torch.cat([hadamard, -hadamard])[:, :bits]
    if classes < rows.shape[0]:
        # skip the all-ones row: it would make one class's centre the all-ones code
        return (rows[1 : classes + 1] > 0).float()
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (classes, bits), generator=generator).float()
