"""Embedder throughput: images/s at batch 1 and 32 for the shipped model, beside a
ResNet-18 at 224x224 (random weights: a yardstick of cost, not a model) in the same run.

    .venv/bin/python benchmarks/embed.py [--threads 2] [--seconds 5]

Needs the 'train' extra (torch) only to build the ResNet-18 yardstick; the shipped
model runs through the product's own Embedder (onnxruntime).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugin"))
from orthanc_cbir.config import DEFAULT_MODEL  # noqa: E402
from orthanc_cbir.model.embedder import Embedder  # noqa: E402


def images_per_second(run, batch: int, seconds: float) -> float:
    run(batch)  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run(batch)
        done += batch
    return done / (time.perf_counter() - start)


def resnet18_onnx(path: Path) -> Path:
    """A standard ResNet-18 (7x7 stem, widths 64-512, 1000 outputs) exported to ONNX."""
    import torch
    from torch import nn

    from orthanc_cbir.training.net import BasicBlock

    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
    ]
    inputs = 64
    for i, width in enumerate((64, 128, 256, 512)):
        layers += [BasicBlock(inputs, width, 1 if i == 0 else 2), BasicBlock(width, width, 1)]
        inputs = width
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 1000)).eval()
    torch.onnx.export(model, (torch.rand(1, 3, 224, 224),), str(path), input_names=["x"], opset_version=18,
                      dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=256)},), dynamo=True,
                      external_data=False)  # fmt: skip
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    rows = []
    for batch in (1, 32):
        embedder = Embedder(DEFAULT_MODEL, threads=args.threads, batch_size=batch)
        size = embedder.card.input_size
        images = rng.random((batch, size, size), dtype=np.float32)
        rows.append((f"shipped {DEFAULT_MODEL.name} ({size}x{size}), full Embedder.embed", batch,
                     images_per_second(lambda b, embedder=embedder, images=images: embedder.embed(images[:b]),
                                       batch, args.seconds)))  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
        session = onnxruntime.InferenceSession(str(resnet18_onnx(Path(tmp) / "r18.onnx")), options,
                                               providers=["CPUExecutionProvider"])  # fmt: skip
        pictures = rng.random((32, 3, 224, 224), dtype=np.float32)
        for batch in (1, 32):
            rows.append(("ResNet-18 (224x224, 3 channels), onnxruntime", batch,
                         images_per_second(lambda b: session.run(None, {"x": pictures[:b]}),
                                           batch, args.seconds)))  # fmt: skip
    print(f"{'model':62} {'batch':>5} {'images/s':>9}")
    for name, batch, rate in rows:
        print(f"{name:62} {batch:5d} {rate:9.1f}")
    print(f"onnxruntime {onnxruntime.__version__}, {args.threads} threads")


if __name__ == "__main__":
    main()
