"""The training loop: ``orthanc-cbir train``.

One network learns four things at once, each with its own loss:

- label heads (modality, region, pathology): cross-entropy, unknown labels skipped;
- sub-code heads: binary cross-entropy towards a per-class hash centre (CSQ), so
  that the modality / region / pathology bits name the class (seed 004);
- the embedding, *within* a class: NT-Xent (SimCLR) between two views of each
  image, where the second view is sometimes the neighbouring slice of the same
  volume; this orders images inside a class instead of collapsing it;
- the embedding, *across* classes: a supervised-contrastive term on the finest
  known label (MedNIST class, pneumonia label, OrganAMNIST organ, plane and region of
  a real volume's slice or reformat), weighted below the instance term;
- training-only heads: the plane of real volumes' images and OrganAMNIST's organ;
- the anatomical level: each step also takes slices of a few real volumes and asks the
  ``level`` head for their differences in mm (body-part regression, Yan et al. 2018) and,
  for chest CTs showing the lungs, for the level itself in the lung frame of
  :mod:`.landmarks` (apex 0, base -250 mm), so that one anatomy gets one level in every
  patient; ``validate-model`` measures the agreement on two patients training never sees.

After the last epoch :func:`fit_descriptor` fits the spectral half of the
descriptor (:mod:`.spectrum`) and an ITQ rotation of the whole descriptor, which
becomes the ``appearance`` bits. The result is saved as ``checkpoint.pt``
(weights, fitted parts, configuration) in the output folder; :mod:`.export` turns
it into ONNX. ``orthanc-cbir refit`` redoes only the fits on a saved checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from ..model.heads import all_heads_correct
from ..model.preprocess import INPUT_SIZE
from .anatomy import HELD_OUT_PATIENTS, anatomy_volumes, read_organamnist, read_volumes
from .augment import jpeg_recompress, random_view
from .data import (
    AUX_LABELS,
    LABELS,
    ImageSet,
    as_model_input,
    block_split,
    image_digests,
    pneumonia_holdback,
    read_mednist,
    read_pneumonia,
)
from .itq import fit_itq
from .net import RetrievalNet, hash_centres
from .spectrum import SpectralDescriptor, combine_features, with_level


@dataclass(frozen=True)
class TrainConfig:
    """What a training run is made of; saved beside the weights."""

    mednist: str
    """The MedNIST archive (``mednist_dev.tar.gz``)."""
    pneumonia: str | None = None
    """PneumoniaMNIST root (``train/`` and ``val/`` inside); ``None`` trains without pathology.
    A tenth of its train split (file-number blocks) is held back as our own test."""
    organamnist: str | None = None
    """OrganAMNIST's ``organamnist.npz`` (train split used); ``None`` trains without organs."""
    anatomy_root: str | None = None
    """The folder holding the real volumes of :func:`.anatomy.anatomy_volumes`; ``None``: none."""
    shared_series: str | None = None
    """``../shared/data/dicom/series`` (the shared real series used beside ``anatomy_root``)."""
    held_out_patients: tuple[str, ...] = HELD_OUT_PATIENTS
    """Patients (:attr:`.anatomy.VolumeSource.patient`) whose volumes training never sees: the two chest
    CTs of the cross-patient level measure, so that its figure is on patients the model never met."""
    epochs: int = 4
    batch_size: int = 256
    learning_rate: float = 2e-3
    widths: tuple[int, int, int, int] = (32, 64, 128, 256)
    blocks: tuple[int, int, int, int] = (1, 1, 2, 2)
    """Basic blocks per stage: one in the two large-resolution stages keeps the model above
    2,000 images/s at batch 32 on 2 CPU cores (benchmarks/embed.py)."""
    embedding_dim: int = 256
    sub_code_bits: int = 8
    """Bits of each label head's sub-code."""
    appearance_bits: int = 104
    """ITQ bits of the descriptor; the code has 3 * sub_code_bits + appearance_bits bits."""
    spectral_frequencies: int = 24
    """Highest |u|, |v| of the Fourier coefficients in the spectral descriptor."""
    spectral_dims: int = 256
    """Whitened PCA dimensions of the spectral descriptor; the features have embedding_dim + spectral_dims."""
    spectral_weight: float = 0.5
    """Share of the spectral half in squared feature distances."""
    temperature: float = 0.1
    supervised_weight: float = 0.2
    neighbour_probability: float = 0.1
    """Chance that an image's second view is its neighbouring slice (volume classes only)."""
    pneumonia_repeat: int = 2
    """Times the (small) PneumoniaMNIST train set appears per epoch."""
    organ_repeat: int = 2
    """Times OrganAMNIST's train split appears per epoch."""
    reformat_repeat: int = 8
    """Extra times the real volumes' coronal and sagittal reformats appear per epoch: about 130
    images among 130,000, a step of 256 would hold one every four steps, too rare for the
    supervised term to group them by plane and region."""
    aux_weight: float = 0.5
    """Weight of the training-only heads' cross-entropy (plane, organ)."""
    level_loss_weight: float = 1.0
    level_consistency_weight: float = 0.2
    """Weight of the level agreeing between an image's two views (every image of a step): a level
    that ignores intensity, zoom and shift depends on anatomy, not on one patient's look."""
    level_zoom: float = 0.2
    """Zoom range of the level slices' views (bodies differ in size by more than 5 %)."""
    level_slices: int = 12
    """Slices of each volume of a step's level loss."""
    level_volumes: int = 4
    """Volumes per step for the level loss."""
    level_anchor_weight: float = 1.0
    """Weight of the level in the lung frame (volumes whose CT shows the lungs), beside its differences."""
    organ_supervised_weight: float = 1.0
    """Weight of a supervised-contrastive term among OrganAMNIST's crops alone: organs of unseen
    patients, not MedNIST's classes, need the tighter grouping (a global weight this high loosens
    the within-class order the Hamming pool relies on)."""
    level_feature_weight: float = 0.5
    """Share of the level encoding in squared feature distances (see :func:`.spectrum.with_level`).
    Used after training only (the fits and the export). 0.5 once the index holds each axial slice at
    its series' level (:mod:`orthanc_cbir.model.level`): on the previous network's checkpoint, at 0.3
    the rest of the descriptor, which knows the patient better than the level, still picked a slice
    over 20 mm away for 14 % and 19 % of the cross-patient queries, at 0.5 for 3 % and 7 %."""
    level_periods_mm: tuple[float, ...] = (3200.0, 800.0, 250.0, 160.0)
    """Periods of the level circles: 20 mm apart stays closer than 50 mm apart over the whole body.
    Used after training only. The finest circle is the shortest of 80, 100, 120, 140 and 160 mm that
    keeps copy detection at 0.99 (a copy's level reads a few mm off its original's, and a shorter
    circle makes that count); it makes a slice 20 mm off count, where the 250 mm circle barely did.
    With each chest CT in its lung frame, the rest of the descriptor chose a slice over 20 mm away
    for 12 % and 22 % of the cross-patient queries with three circles, 5 % and 7 % with this one
    (these are the measures it was chosen on: README, "The model")."""
    seed: int = 0
    threads: int = 2
    limit: int | None = None
    """Use only this many training images (tiny runs in tests)."""
    split_block: int = 300
    """MedNIST file-number block size of the train / validation split (see :func:`.data.block_split`)."""
    cache_dir: str | None = "state/cache"

    def sub_code_lengths(self) -> dict[str, int]:
        return {**{head: self.sub_code_bits for head in LABELS}, "appearance": self.appearance_bits}


@dataclass
class TrainingData:
    train: ImageSet
    validation: ImageSet
    pneumonia_validation: ImageSet | None


def load_data(config: TrainConfig) -> TrainingData:
    """MedNIST split by file-number blocks, plus PneumoniaMNIST's own train / val."""
    mednist = read_mednist(Path(config.mednist), Path(config.cache_dir) if config.cache_dir else None)
    train_index, validation_index = block_split(mednist, block=config.split_block)
    train = mednist.subset(train_index)
    pneumonia_validation = None
    if config.pneumonia:
        pneumonia = read_pneumonia(Path(config.pneumonia), "train")
        pneumonia = pneumonia.subset(pneumonia_holdback(pneumonia)[0])
        pneumonia.fine_class = pneumonia.fine_class + len(np.unique(mednist.fine_class))
        train = ImageSet.concatenate([train] + [pneumonia] * config.pneumonia_repeat)
        pneumonia_validation = read_pneumonia(Path(config.pneumonia), "val")
    if config.organamnist:
        organs = read_organamnist(Path(config.organamnist), "train")
        train = ImageSet.concatenate([train] + [organs] * config.organ_repeat)
    if config.anatomy_root and config.shared_series:
        sources = anatomy_volumes(Path(config.anatomy_root), Path(config.shared_series))
        volumes = read_volumes([v for v in sources if v.patient not in config.held_out_patients and v.path.exists()])
        region = np.where(volumes.labels["region"] >= 0, volumes.labels["region"], 9)
        volumes.fine_class = 200 + 10 * region + volumes.aux["plane"]
        reformats = volumes.subset(np.flatnonzero(volumes.aux["plane"] != AUX_LABELS["plane"].index("axial")))
        train = ImageSet.concatenate([train, volumes] + [reformats] * config.reformat_repeat)
    if config.limit:
        rng = np.random.default_rng(config.seed)
        train = train.subset(np.sort(rng.choice(len(train), size=min(config.limit, len(train)), replace=False)))
    return TrainingData(train, mednist.subset(validation_index), pneumonia_validation)


def build_net(config: TrainConfig) -> RetrievalNet:
    """The network a configuration describes (training and export build it the same way)."""
    return RetrievalNet(
        {head: len(names) for head, names in LABELS.items()}, {head: config.sub_code_bits for head in LABELS},
        config.widths, config.embedding_dim, config.blocks, {name: len(names) for name, names in AUX_LABELS.items()},
    )  # fmt: skip


def neighbour_index(image_set: ImageSet) -> np.ndarray:
    """For each image, a neighbouring slice of the same volume (or -1)."""
    order = np.lexsort((image_set.position, image_set.group))
    neighbours = np.full(len(image_set), -1, dtype=np.int64)
    for previous, current in zip(order[:-1], order[1:], strict=True):
        same_stack = image_set.group[current] >= 0 and image_set.group[current] == image_set.group[previous]
        if same_stack and 0 < image_set.position[current] - image_set.position[previous] <= 2:
            neighbours[current] = previous
            if neighbours[previous] < 0:
                neighbours[previous] = current
    return neighbours


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss on (2N, D) normalised features whose rows i and i+N are two views."""
    n = z.shape[0] // 2
    similarity = z @ z.T / temperature
    similarity.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(similarity, targets)


def supervised_contrastive(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Khosla et al. 2020 on (M, D) normalised features; rows labelled -1 are skipped."""
    keep = labels >= 0
    z, labels = z[keep], labels[keep]
    similarity = z @ z.T / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool)
    similarity = similarity.masked_fill(self_mask, float("-inf"))
    log_probability = similarity - torch.logsumexp(similarity, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    count = positives.sum(dim=1)
    has_positive = count > 0
    mean_log = log_probability.masked_fill(~positives, 0.0).sum(dim=1)[has_positive] / count[has_positive]
    return -mean_log.mean()


def level_batches(image_set: ImageSet) -> list[np.ndarray]:
    """Per volume, the rows whose level is known (axial slices of real volumes)."""
    known = ~np.isnan(image_set.aux["level"])
    return [np.flatnonzero(known & (image_set.group == g)) for g in np.unique(image_set.group[known])]


def level_loss(level: torch.Tensor, target_mm: torch.Tensor, volume: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 between predicted and true level differences (units of 100 mm) over all pairs
    of rows of one volume: the offset of each volume stays free."""
    same = (volume[:, None] == volume[None, :]) & ~torch.eye(len(volume), dtype=torch.bool)
    predicted = level[:, None] - level[None, :]
    actual = (target_mm[:, None] - target_mm[None, :]) / 100.0
    return F.smooth_l1_loss(predicted[same], actual[same])


def level_targets(image_set: ImageSet, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The level loss's targets for ``rows``: mm in the lung frame where the volume has it, else the
    volume's own z; and which rows have the lung frame (their level itself is a target)."""
    anatomical = image_set.aux["anatomical_level"][rows]
    anchored = ~np.isnan(anatomical)
    target = np.where(anchored, anatomical, image_set.aux["level"][rows])
    return torch.from_numpy(target.astype(np.float32)), torch.from_numpy(anchored)


def train(config: TrainConfig, out_dir: Path, progress: bool = True) -> dict:
    """Train, fit ITQ, save ``checkpoint.pt`` in ``out_dir``; returns the training summary."""
    started = time.monotonic()
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    data = load_data(config)
    train_set = data.train
    neighbours = neighbour_index(train_set)

    head_sizes = {head: len(names) for head, names in LABELS.items()}
    net = build_net(config)
    centres = {
        head: hash_centres(size, config.sub_code_bits, seed=i) for i, (head, size) in enumerate(head_sizes.items())
    }
    steps_per_epoch = max(1, len(train_set) // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    optimiser = torch.optim.AdamW(net.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=config.learning_rate, total_steps=total_steps,
                                                   pct_start=0.15)  # fmt: skip
    labels = {head: torch.from_numpy(values) for head, values in train_set.labels.items()}
    aux = {name: torch.from_numpy(train_set.aux[name]) for name in AUX_LABELS}
    fine = torch.from_numpy(train_set.fine_class)
    volumes = level_batches(train_set)
    history = []

    bar = tqdm(total=total_steps, disable=not progress, desc="train", unit="step", dynamic_ncols=True)
    for epoch in range(config.epochs):
        net.train()
        order = rng.permutation(len(train_set))
        for step in range(steps_per_epoch):
            index = order[step * config.batch_size : (step + 1) * config.batch_size]
            partner = index.copy()
            use_neighbour = (rng.random(len(index)) < config.neighbour_probability) & (neighbours[index] >= 0)
            partner[use_neighbour] = neighbours[index[use_neighbour]]
            views = [
                random_view(_as_tensor(jpeg_recompress(train_set.images[i], rng)), generator) for i in (index, partner)
            ]
            stacks = _level_rows(volumes, config.level_volumes, config.level_slices, rng)
            if len(stacks):
                views.append(random_view(_as_tensor(train_set.images[stacks]), generator, max_shift_px=6.0,
                                         max_zoom=config.level_zoom))  # fmt: skip
            out = net(torch.cat(views))
            main = 2 * len(index)
            level_out = out["level"][main:]
            view_levels = out["level"][:main].view(2, -1)
            out = {name: value[:main] for name, value in out.items()}
            both = torch.from_numpy(np.concatenate([index, index]))
            losses = {
                "instance": nt_xent(out["features"], config.temperature),
                "supervised": config.supervised_weight
                * supervised_contrastive(out["features"], fine[both], config.temperature),
            }
            organs = aux["organ"][both]
            if (organs >= 0).sum() > 1:
                losses["organ_supervised"] = config.organ_supervised_weight * supervised_contrastive(
                    out["features"][organs >= 0], organs[organs >= 0], config.temperature
                )
            for head in LABELS:
                target = labels[head][both]
                if (target >= 0).any():
                    known = target >= 0
                    losses[head] = F.cross_entropy(out[head][known], target[known])
                    losses[f"code_{head}"] = F.binary_cross_entropy_with_logits(
                        out[f"code_{head}"][known], centres[head][target[known]]
                    )
            for name in AUX_LABELS:
                target = aux[name][both]
                if (target >= 0).any():
                    known = target >= 0
                    losses[name] = config.aux_weight * F.cross_entropy(out[name][known], target[known])
            losses["level_views"] = config.level_consistency_weight * F.smooth_l1_loss(view_levels[0], view_levels[1])
            if len(stacks):
                target_mm, anchored = level_targets(train_set, stacks)
                losses["level"] = config.level_loss_weight * level_loss(
                    level_out, target_mm, torch.from_numpy(train_set.group[stacks])
                )
                if anchored.any():
                    losses["level_anchor"] = config.level_anchor_weight * F.smooth_l1_loss(
                        level_out[anchored], target_mm[anchored] / 100.0
                    )
            loss = cast(torch.Tensor, sum(losses.values()))  # losses is never empty
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", inst=f"{losses['instance'].item():.3f}")
        figures = validate(net, data)
        history.append({"epoch": epoch + 1, "loss": float(loss.item()), **figures})
        bar.write(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in figures.items()))
    bar.close()

    summary = {
        "config": dataclasses.asdict(config),
        "history": history,
        "train_images": len(train_set),
        "seconds": round(time.monotonic() - started, 1),
        "torch": torch.__version__,
    }
    save_checkpoint(out_dir, net, fit_descriptor(net, train_set, config), summary)
    return summary


@dataclass
class DescriptorFit:
    """What is fitted on the training images after the last epoch."""

    spectral: SpectralDescriptor
    itq_mean: np.ndarray
    itq_projection: np.ndarray


def build_spectral(config: TrainConfig) -> SpectralDescriptor:
    return SpectralDescriptor(INPUT_SIZE, config.spectral_frequencies, config.spectral_dims)


@torch.no_grad()
def fit_descriptor(net: RetrievalNet, train_set: ImageSet, config: TrainConfig) -> DescriptorFit:
    """Fit the spectral PCA and the ITQ appearance bits on the distinct training images."""
    net.eval()
    _, first = np.unique(np.array(image_digests(train_set.images)), return_index=True)
    distinct = train_set.subset(np.sort(first))
    spectral = build_spectral(config)
    spectral.fit(as_model_input(distinct.images))
    features = descriptor_features(net, spectral, distinct, config)
    rng = np.random.default_rng(config.seed)
    sample = rng.choice(len(features), size=min(20000, len(features)), replace=False)
    itq_mean, itq_projection = fit_itq(features[sample], config.appearance_bits, seed=config.seed)
    return DescriptorFit(spectral, itq_mean, itq_projection)


def save_checkpoint(out_dir: Path, net: RetrievalNet, fit: DescriptorFit, summary: dict) -> Path:
    """``checkpoint.pt`` (everything export needs) and ``training.json`` (the summary) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "checkpoint.pt"
    torch.save({"state_dict": net.state_dict(), "spectral": fit.spectral.state_dict(), "itq_mean": fit.itq_mean,
                "itq_projection": fit.itq_projection, "summary": summary}, path)  # fmt: skip
    (out_dir / "training.json").write_text(json.dumps(summary, indent=2))
    return path


def load_trained(checkpoint: Path) -> tuple[RetrievalNet, TrainConfig, dict]:
    """The trained network (eval mode), its configuration and everything else the checkpoint holds."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    # JSON made the configuration's tuples lists
    config_fields: dict[str, Any] = {name: tuple(value) if isinstance(value, list) else value
                                     for name, value in saved["summary"]["config"].items()}  # fmt: skip
    config = TrainConfig(**config_fields)
    net = build_net(config)
    net.load_state_dict(saved["state_dict"])
    return net.eval(), config, saved


def refit(checkpoint: Path, out_dir: Path, level_periods_mm: tuple[float, ...] | None = None) -> dict:
    """Redo :func:`fit_descriptor` on a trained checkpoint (same weights, same data), with other
    level periods if given (a choice made after training); save the result in ``out_dir``; returns
    the summary, which records the refit."""
    started = time.monotonic()
    net, config, saved = load_trained(checkpoint)
    if level_periods_mm is not None:
        config = dataclasses.replace(config, level_periods_mm=tuple(level_periods_mm))
    torch.set_num_threads(config.threads)
    fit = fit_descriptor(net, load_data(config).train, config)
    summary = {**saved["summary"], "config": dataclasses.asdict(config),
               "refit": {"from": str(checkpoint), "seconds": round(time.monotonic() - started, 1)}}  # fmt: skip
    save_checkpoint(out_dir, net, fit, summary)
    return summary


def _as_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(as_model_input(images))


def _level_rows(volumes: list[np.ndarray], count: int, per_volume: int, rng: np.random.Generator) -> np.ndarray:
    """Rows of ``count`` random volumes (``per_volume`` slices each) for one step's level loss."""
    if not volumes:
        return np.zeros(0, dtype=np.int64)
    chosen = rng.choice(len(volumes), size=min(count, len(volumes)), replace=False)
    rows = [rng.choice(volumes[v], size=min(per_volume, len(volumes[v])), replace=False) for v in chosen]
    return np.concatenate(rows)


def exported_features(out: dict[str, torch.Tensor], spectral: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """The model's ``features`` output from the network's outputs and the spectral descriptor."""
    descriptor = combine_features(out["features"], spectral, config.spectral_weight)
    return with_level(descriptor, out["level"], config.level_feature_weight, config.level_periods_mm)


@torch.no_grad()
def descriptor_features(
    net: RetrievalNet, spectral: SpectralDescriptor, image_set: ImageSet, config: TrainConfig, batch: int = 512
) -> np.ndarray:
    """The exported model's ``features`` output, computed in torch."""
    net.eval()
    parts = []
    for start in range(0, len(image_set), batch):
        images = _as_tensor(image_set.images[start : start + batch])
        parts.append(exported_features(net(images), spectral(images), config).numpy())
    return np.concatenate(parts)


@torch.no_grad()
def validate(net: RetrievalNet, data: TrainingData) -> dict[str, float]:
    """Quick figures after each epoch: MedNIST class accuracy, pneumonia accuracy."""
    net.eval()
    figures = {"mednist_accuracy": _accuracy(net, data.validation, ("modality", "region"))}
    if data.pneumonia_validation is not None:
        figures["pneumonia_accuracy"] = _accuracy(net, data.pneumonia_validation, ("pathology",))
    return figures


def _accuracy(net: RetrievalNet, image_set: ImageSet, heads: tuple[str, ...]) -> float:
    outputs = [net(_as_tensor(image_set.images[start : start + 512])) for start in range(0, len(image_set), 512)]
    scores = {head: np.concatenate([out[head].numpy() for out in outputs]) for head in heads}
    return float(all_heads_correct(scores, {head: image_set.labels[head] for head in heads}).mean())
