"""Run the shipped retrieval model with onnxruntime.

>>> embedder = Embedder(DEFAULT_MODEL)                      # doctest: +SKIP
>>> out = embedder.embed_pixels([decoded.images[0].pixels]) # doctest: +SKIP
>>> out.features.shape, out.codes.shape, sorted(out.probabilities)  # doctest: +SKIP
((1, 256), (1, 16), ['modality', 'pathology', 'region'])

The model card (JSON beside the .onnx file) says what the model promises: input
size, embedding size D, code bits B and their sub-code layout, label names, file
hash. :class:`Embedder` checks the ONNX graph against the card and refuses a
model that breaks the contract with :class:`ModelContractError`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import DEFAULT_MODEL
from ..errors import ModelContractError
from .codes import CodeLayout, pack_codes
from .level import LevelEncoding
from .preprocess import to_model_input

INPUT_NAME = "image"
FEATURES = "features"
CODE_LOGITS = "code_logits"
CLASS_LOGITS_PREFIX = "class_logits_"


@dataclass(frozen=True)
class ModelCard:
    """The model card: what the ONNX file takes and gives, and how it was made."""

    name: str
    sha256: str
    input_size: int
    embedding_dim: int
    code_layout: CodeLayout
    labels: dict[str, tuple[str, ...]]
    raw: dict[str, Any]
    """The whole card as read (training data, licences, validation figures...)."""
    level: LevelEncoding | None = None
    """Where the features hold the anatomical level (``outputs.level``); ``None``: they do not."""

    @property
    def code_bits(self) -> int:
        return self.code_layout.bits

    @property
    def version(self) -> str:
        """What index records are keyed by: the name and the file hash, so two
        different weights never share an index."""
        return f"{self.name}@{self.sha256[:12]}"

    @classmethod
    def load(cls, path: Path) -> ModelCard:
        try:
            raw = json.loads(Path(path).read_text())
            return cls(
                name=str(raw["name"]),
                sha256=str(raw["onnx"]["sha256"]),
                input_size=int(raw["input"]["size"]),
                embedding_dim=int(raw["outputs"]["features"]),
                code_layout=CodeLayout.from_json(raw["code_layout"]),
                labels={head: tuple(names) for head, names in raw["labels"].items()},
                raw=raw,
                level=LevelEncoding.from_card(raw["outputs"]),
            )
        except FileNotFoundError:
            raise ModelContractError(f"no model card at {path}: a model is only used with its card") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelContractError(f"model card {path} is incomplete or malformed: {exc}") from None


def card_path(model_path: Path) -> Path:
    """Where the card of an ONNX file lives: same name, ``.json``."""
    return Path(model_path).with_suffix(".json")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Embeddings:
    """The model's answer for N images."""

    features: np.ndarray
    """float32 (N, D), L2-normalised."""
    codes: np.ndarray
    """uint8 (N, B/8), packed bits (bit = code logit > 0)."""
    probabilities: dict[str, np.ndarray]
    """Per label head, float32 (N, classes) softmax probabilities."""


class Embedder:
    """An onnxruntime session over a model that honours its card."""

    def __init__(self, model_path: Path = DEFAULT_MODEL, *, threads: int = 2, batch_size: int = 32):
        import onnxruntime

        self.model_path = Path(model_path)
        self.card = ModelCard.load(card_path(self.model_path))
        if not self.model_path.exists():
            raise ModelContractError(f"model file {self.model_path} not found")
        actual = file_sha256(self.model_path)
        if actual != self.card.sha256:
            raise ModelContractError(
                f"{self.model_path.name} has sha256 {actual[:12]}..., its card says {self.card.sha256[:12]}...: "
                "the file and the card are from different exports"
            )
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(self.model_path), options, providers=["CPUExecutionProvider"])
        self.batch_size = batch_size
        self._check_contract()

    @classmethod
    def from_settings(cls, settings: Any) -> Embedder:
        """The embedder a :class:`~orthanc_cbir.config.Settings` describes (model, threads, batch size)."""
        return cls(Path(settings.model), threads=settings.embed_threads, batch_size=settings.embed_batch_size)

    @property
    def version(self) -> str:
        return self.card.version

    def _check_contract(self) -> None:
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        outputs = {o.name: o.shape for o in self.session.get_outputs()}
        size = self.card.input_size
        if list(inputs) != [INPUT_NAME] or list(inputs[INPUT_NAME][1:]) != [1, size, size]:
            raise ModelContractError(f"model input must be {INPUT_NAME}[N,1,{size},{size}], got {inputs}")
        expected = {FEATURES: self.card.embedding_dim, CODE_LOGITS: self.card.code_bits}
        expected.update({CLASS_LOGITS_PREFIX + head: len(names) for head, names in self.card.labels.items()})
        for name, width in expected.items():
            if name not in outputs or outputs[name][-1] != width:
                raise ModelContractError(f"model output {name} must have width {width}; the graph has {outputs}")
        if self.card.code_bits % 8:
            raise ModelContractError(f"code bits must be a multiple of 8, the card says {self.card.code_bits}")

    def embed(self, images: np.ndarray) -> Embeddings:
        """Embed model inputs: float32 (N, S, S) or (N, 1, S, S) in 0..1, S = the card's input size."""
        images = np.asarray(images, dtype=np.float32)
        if images.ndim == 3:
            images = images[:, None]
        heads = list(self.card.labels)
        names = [FEATURES, CODE_LOGITS] + [CLASS_LOGITS_PREFIX + head for head in heads]
        parts: list[list[np.ndarray]] = [[] for _ in names]
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            for part, value in zip(parts, self.session.run(names, {INPUT_NAME: batch}), strict=True):
                part.append(value)
        if not len(images):
            empty = {head: np.zeros((0, len(self.card.labels[head])), np.float32) for head in heads}
            return Embeddings(np.zeros((0, self.card.embedding_dim), np.float32),
                              np.zeros((0, self.card.code_bits // 8), np.uint8), empty)  # fmt: skip
        features, code_logits, *logits = (np.concatenate(part) for part in parts)
        return Embeddings(
            features=features.astype(np.float32),
            codes=pack_codes(code_logits),
            probabilities={head: _softmax(value) for head, value in zip(heads, logits, strict=True)},
        )

    def embed_pixels(self, images: Sequence[np.ndarray]) -> Embeddings:
        """Embed normalised grey images of any size (see :mod:`orthanc_cbir.dicom`)."""
        size = self.card.input_size
        return self.embed(
            np.stack([to_model_input(p, size) for p in images]) if len(images) else np.zeros((0, size, size))
        )


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)
