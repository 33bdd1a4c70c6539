"""Coarse-to-fine recall against the exact embedding for codes of 64, 128 and 256 bits.

The shipped model's label sub-codes (24 bits) are kept; the appearance bits are an
ITQ rotation of its features with B - 24 bits, fitted on the MedNIST training
blocks (as the export does). Queries are the held-out blocks without duplicates.

    .venv/bin/python benchmarks/code_bits.py

Prints, per B, recall@10 vs exact for Hamming pools of 0.5 / 1 / 2 / 5 / 10 % of
the gallery, and the code statistics. Needs ../shared/data.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugin"))
from orthanc_cbir.config import DEFAULT_MODEL  # noqa: E402
from orthanc_cbir.evaluation.metrics import code_statistics, recall_vs_exact  # noqa: E402
from orthanc_cbir.evaluation.model_report import POOL_FRACTIONS  # noqa: E402
from orthanc_cbir.model.embedder import Embedder  # noqa: E402
from orthanc_cbir.training.data import block_split, drop_duplicates, read_mednist  # noqa: E402
from orthanc_cbir.training.itq import fit_itq  # noqa: E402

MEDNIST = ROOT.parent / "shared" / "data" / "mednist" / "mednist_dev.tar.gz"


def main() -> None:
    embedder = Embedder(DEFAULT_MODEL, batch_size=256)
    label_bits = sum(s.length for s in embedder.card.code_layout.sub_codes if s.name != "appearance")
    mednist = read_mednist(MEDNIST, ROOT / "state" / "cache")
    train, validation = block_split(mednist)
    queries = drop_duplicates(validation, mednist)
    out = embedder.embed(mednist.as_float())
    label_codes = np.unpackbits(out.codes, axis=1)[:, :label_bits]
    rng = np.random.default_rng(0)
    sample = rng.choice(len(train), size=20000, replace=False)
    print(f"gallery {len(train)}, queries {len(queries)}; pools as a share of the gallery")
    print(f"{'bits':>5} " + " ".join(f"{f * 100:>6.1f}%" for f in POOL_FRACTIONS) + "  distinct  mean-bucket")
    for bits in (64, 128, 256):
        mean, projection = fit_itq(out.features[train][sample], bits - label_bits, seed=0)
        appearance = (out.features - mean) @ projection > 0
        codes = np.packbits(np.concatenate([label_codes, appearance], axis=1), axis=1)
        curve = recall_vs_exact(
            out.features[queries], codes[queries], out.features[train], codes[train], POOL_FRACTIONS
        )
        stats = code_statistics(codes[train])
        print(f"{bits:5d} " + " ".join(f"{curve[f]:7.4f}" for f in POOL_FRACTIONS)
              + f"  {stats['distinct_codes']:8d}  {stats['mean_bucket_size']:11.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
