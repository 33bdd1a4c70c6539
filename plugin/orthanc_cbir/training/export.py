"""``orthanc-cbir export``: a training checkpoint to one ONNX file and its model card.

The ONNX graph takes ``image`` [N,1,S,S] (0..1, from
:func:`~orthanc_cbir.model.preprocess.to_model_input`) and gives ``features``
[N,D] (CNN embedding and spectral descriptor, :mod:`.spectrum`), ``code_logits``
[N,B] (label sub-codes then the ITQ ``appearance`` bits)
and ``class_logits_<head>`` per label head. The card (same name, ``.json``)
records the contract, the training run and the file's hash; validation figures
are added by :mod:`orthanc_cbir.evaluation.model_report`.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..dicom.pixels import CT_MODEL_MAPPING
from ..model.codes import CodeLayout
from ..model.embedder import CLASS_LOGITS_PREFIX, CODE_LOGITS, FEATURES, INPUT_NAME, card_path, file_sha256
from ..model.level import LevelEncoding
from ..model.lung_extent import LUNG_SPAN_MM
from ..model.preprocess import INPUT_SIZE
from .anatomy import SOURCES, extra_sources
from .data import LABELS
from .net import RetrievalNet
from .spectrum import SpectralDescriptor
from .train import TrainConfig, build_spectral, exported_features, load_trained

DATA_CREDITS = {
    "MedNIST": "B. J. Erickson, Mayo Clinic (sources: TCIA, RSNA Bone Age, NIH Chest X-ray); CC BY-SA 4.0",
    "PneumoniaMNIST": "MedMNIST v2 (Yang et al. 2023), from Kermany et al. 2018; CC BY 4.0",
}


def feature_dim(config: TrainConfig) -> int:
    """Width of the ``features`` output: CNN embedding, spectral descriptor, level encoding."""
    return config.embedding_dim + config.spectral_dims + 2 * len(config.level_periods_mm)


class ExportedModel(nn.Module):
    """The network, the spectral descriptor and the ITQ appearance code, with the
    output names of the contract."""

    # the buffers __init__ registers (nn.Module's __getattr__ is typed Tensor | Module)
    itq_mean: torch.Tensor
    itq_projection: torch.Tensor

    def __init__(self, net: RetrievalNet, spectral: SpectralDescriptor, config: TrainConfig,
                 itq_mean: np.ndarray, itq_projection: np.ndarray):  # fmt: skip
        super().__init__()
        self.net = net
        self.spectral = spectral
        self.config = config
        self.register_buffer("itq_mean", torch.from_numpy(np.asarray(itq_mean, dtype=np.float32)))
        self.register_buffer("itq_projection", torch.from_numpy(np.asarray(itq_projection, dtype=np.float32)))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.net(image)
        features = exported_features(out, self.spectral(image), self.config)
        appearance = (features - self.itq_mean) @ self.itq_projection
        code_logits = torch.cat([out[f"code_{head}"] for head in LABELS] + [appearance], dim=1)
        return (features, code_logits, *[out[head] for head in LABELS])


def load_checkpoint(checkpoint: Path) -> tuple[ExportedModel, TrainConfig, dict]:
    """The exportable model, its training configuration and the training summary."""
    net, config, saved = load_trained(checkpoint)
    if "spectral" not in saved:
        raise ValueError(f"{checkpoint} predates the spectral descriptor: run 'orthanc-cbir refit' on it first")
    spectral = build_spectral(config)
    spectral.load_state_dict(saved["spectral"])
    model = ExportedModel(net, spectral, config, saved["itq_mean"], saved["itq_projection"]).eval()
    return model, config, saved["summary"]


def level_encoding(config: TrainConfig) -> LevelEncoding:
    """Where :func:`~.spectrum.with_level` puts the level in the exported features."""
    return LevelEncoding(config.embedding_dim + config.spectral_dims, tuple(config.level_periods_mm),
                         config.level_feature_weight)  # fmt: skip


def export(checkpoint: Path, onnx_path: Path, name: str | None = None) -> Path:
    """Write ``onnx_path`` and its card; returns the card's path."""
    model, config, summary = load_checkpoint(checkpoint)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    outputs = [FEATURES, CODE_LOGITS] + [CLASS_LOGITS_PREFIX + head for head in LABELS]
    example = torch.rand(2, 1, INPUT_SIZE, INPUT_SIZE)
    torch.onnx.export(
        model, (example,), str(onnx_path), input_names=[INPUT_NAME], output_names=outputs,
        dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1, max=4096)}},
        opset_version=18, external_data=False, dynamo=True,
    )  # fmt: skip
    layout = CodeLayout.from_lengths(config.sub_code_lengths())
    card = {
        "name": name or onnx_path.stem,
        "onnx": {"file": onnx_path.name, "sha256": file_sha256(onnx_path), "opset": 18},
        "input": {
            "name": INPUT_NAME,
            "size": INPUT_SIZE,
            "layout": "[N, 1, size, size] float32 in 0..1",
            "preprocessing": "orthanc_cbir.dicom pixel step, model picture (model_pixels): Modality LUT, then CT "
            "Hounsfield units through one fixed piecewise-linear mapping and every other grey image through its "
            "0.5-99.5 percentile range, never the file's display window (VOI); MONOCHROME1 inverted; colour to "
            "luma. Then orthanc_cbir.model.preprocess.to_model_input: pad to a square, area (down) / bilinear "
            "(up) resize. Previews, thumbnails and Similar cases pictures keep the file's VOI.",
            "ct_mapping_hu_to_grey": [list(knot) for knot in CT_MODEL_MAPPING],
        },
        "outputs": {
            "features": feature_dim(config),
            "features_note": "L2-normalised; rank by Euclidean (= cosine) distance. The CNN embedding "
            f"({config.embedding_dim}) and the whitened log-spectrum ({config.spectral_dims}, |u|,|v| <= "
            f"{config.spectral_frequencies}), weights {1 - config.spectral_weight:g} / {config.spectral_weight:g}, "
            f"then the anatomical level on circles of periods {list(config.level_periods_mm)} mm "
            f"({2 * len(config.level_periods_mm)} dims) at {config.level_feature_weight:g} of the squared distance; "
            "an axial slice of a series is indexed at its series' level (orthanc_cbir.model.level)",
            "level": level_encoding(config).to_card(),
            "code_logits": layout.bits,
            "code_note": "bit = logit > 0, packed MSB first; sub-codes per code_layout",
            **{CLASS_LOGITS_PREFIX + head: len(names) for head, names in LABELS.items()},
        },
        "code_layout": layout.to_json(),
        "labels": {head: list(names) for head, names in LABELS.items()},
        "architecture": {"backbone": "residual CNN, 4 stages of basic blocks", "widths": list(config.widths),
                         "blocks": list(config.blocks),
                         "parameters": sum(p.numel() for p in model.net.parameters()),
                         "spectral": "Hann-windowed low-frequency DFT log-magnitude, PCA-whitened"},  # fmt: skip
        "training": {
            "data": {"mednist": "mednist_dev.tar.gz, file-number blocks of 300 per class, every 10th block held out",
                     "pneumoniamnist": "train split less every 10th file-number block of 50 (held back as our "
                                       "own test; val held out too)" if config.pneumonia else None,
                     "organamnist": "train split (val and test, other patients, held out)"
                                    if config.organamnist else None,
                     "volumes": "real CT/MR volumes (axial slices with their level, coronal and sagittal "
                                f"reformats, these {1 + config.reformat_repeat} times an epoch)"
                                if config.anatomy_root else None},  # fmt: skip
            "credits": DATA_CREDITS,
            "held_out_patients": list(config.held_out_patients) if config.anatomy_root else [],
            "sources": {**SOURCES, **{entry["name"]: entry for entry in extra_sources(Path(config.anatomy_root))}}
            if config.anatomy_root else (SOURCES if config.organamnist else {}),
            "seed": config.seed,
            "epochs": config.epochs,
            "losses": "cross-entropy per head; CSQ hash centres per label sub-code; NT-Xent on two views "
            "(JPEG, shift, zoom, rotation, intensity, noise; neighbouring slice as second view); "
            "supervised contrastive on the finest label (MedNIST class, pathology, organ, plane x region of "
            f"real volumes), and among OrganAMNIST crops alone at {config.organ_supervised_weight:g}; "
            "training-only heads for plane and organ; level (body-part regression): smooth-L1 on level "
            "differences in mm between slices of one volume and, for CT volumes showing the lungs, on the "
            f"level itself in the lung frame (apex 0 mm, base -{LUNG_SPAN_MM:g} mm; apex and base found from "
            "the aerated lungs, training.landmarks); after training: spectral PCA, ITQ appearance bits of "
            "the whole descriptor",
            "seconds": summary["seconds"],
            "torch": summary["torch"],
            "history": summary["history"],
            "command": f"orthanc-cbir train --epochs {config.epochs} --seed {config.seed}"
            + (" --anatomy ANATOMY_ROOT" if config.anatomy_root else ""),
            **({"refit": summary["refit"]} if "refit" in summary else {}),
        },
        "exported": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "validation": None,
    }
    path = card_path(onnx_path)
    path.write_text(json.dumps(card, indent=2) + "\n")
    return path
