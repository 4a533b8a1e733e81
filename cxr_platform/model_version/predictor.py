"""Score images with an exported ONNX model and the preprocessing stored inside it.

Everything that turns bytes into a decision lives here, so the batch CLI, the HTTP service and
the DICOM node cannot drift apart: decode (``read_image``) -> the model's own preprocessing ->
ONNX Runtime -> Platt calibration -> the model's own threshold.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from cxr_platform.data.imaging import DEFAULT_MAX_PIXELS, DecodedImage, ImageSource, read_image
from cxr_platform.data.patient_age import AgeReading
from cxr_platform.data.preprocessing import normalize_uint8, to_square_uint8
from cxr_platform.model_version.files import (
    INT8_ONNX_FILE,
    ONNX_FILE,
    ExportError,
    ModelMetadata,
    onnx_session,
    session_metadata,
)
from cxr_platform.model_version.input_gate import ACCEPTED_WITHOUT_GATE, GateVerdict, InputGate
from cxr_platform.model_version.intended_use import UNLIKE_POPULATION, IntendedUse
from cxr_platform.model_version.population_check import PopulationCheck


@dataclass(frozen=True)
class Prediction:
    probability: float  # calibrated probability of pneumonia
    label: str
    logit: float
    threshold: float
    model_name: str
    model_version: str | None

    def to_dict(self) -> dict:
        return asdict(self)


SYNTHETIC_DEMO_SET = "synthetic demo set"  # the training folder an intended use names for it
SYNTHETIC_ONLY = (
    "this model version was trained on the synthetic demo images only and knows no real "
    "radiograph; train one on real data (the README's 'A real model')"
)


@dataclass(frozen=True)
class PreparedImage:
    pixels: np.ndarray  # uint8 (S, S): what the network sees before normalization
    decoded: DecodedImage


class Predictor:
    """One loaded model. Thread-safe: ONNX Runtime sessions may be run concurrently."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        model_version: str | None = None,
        threads: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        precision: str = "fp32",
    ) -> None:
        path = Path(model_path)
        if path.is_dir():
            if precision not in ("fp32", "int8"):
                raise ExportError(f"precision must be fp32 or int8, not {precision!r}")
            path = path / (INT8_ONNX_FILE if precision == "int8" else ONNX_FILE)
            if not path.exists():
                raise ExportError(
                    f"{path.parent} has no {precision} model"
                    + (
                        " (it was not kept: see the version's cxr.int8 tag)"
                        if precision == "int8"
                        else ""
                    )
                )
        self.onnx_path = path
        self.session = onnx_session(self.onnx_path, threads=threads)
        self.metadata: ModelMetadata = session_metadata(self.session, self.onnx_path)
        self.input_name = self.session.get_inputs()[0].name
        self.preprocessing = self.metadata.preprocessing_config
        self.calibration = self.metadata.calibration
        self.model_version = model_version
        self.max_pixels = max_pixels
        gate = self.metadata.input_gate
        self.gate: InputGate | None = InputGate.from_dict(gate) if gate else None
        self.intended_use: IntendedUse | None = self.metadata.use
        population = self.metadata.population_check
        outputs = [output.name for output in self.session.get_outputs()]
        # The check needs the graph's features output; a version without it checks nothing.
        self.population: PopulationCheck | None = (
            PopulationCheck.from_dict(population)
            if population and self.metadata.features_name in outputs
            else None
        )
        self._features_index = (
            outputs.index(self.metadata.features_name)
            if self.metadata.features_name in outputs
            else None
        )

    @property
    def model_name(self) -> str:
        return self.metadata.model_name

    @property
    def threshold(self) -> float:
        return self.calibration.threshold

    def prepare(self, source: ImageSource | DecodedImage) -> PreparedImage:
        """Decode and bring to the model's square uint8 input. Raises :class:`ImageReadError`."""
        decoded = (
            source
            if isinstance(source, DecodedImage)
            else read_image(
                source,
                max_pixels=self.max_pixels,
                draft_size=2 * self.preprocessing.image_size,
            )
        )
        return PreparedImage(to_square_uint8(decoded.pixels, self.preprocessing), decoded)

    def judge_input(self, original: np.ndarray, square: np.ndarray) -> GateVerdict:
        """This version's input gate on one image: the decoded original (float [0, 1]) and its
        model input. Versions exported without a gate accept everything."""
        if self.gate is None:
            return ACCEPTED_WITHOUT_GATE
        verdict = self.gate.judge(original, square)
        if not verdict.accepted and self.trained_on_synthetic_images:
            # A newcomer's first real radiograph meets the demo's model: say why it is refused.
            verdict = replace(verdict, detail=f"{verdict.detail}; {SYNTHETIC_ONLY}")
        return verdict

    @property
    def trained_on_synthetic_images(self) -> bool:
        """The version was trained on the synthetic demo set (`cxr demo` without --data)."""
        if self.intended_use is None:
            return False
        return self.intended_use.training_source.get("data_folder") == SYNTHETIC_DEMO_SET

    def judge_age(self, reading: AgeReading) -> GateVerdict | None:
        """The refusal for a stated age outside this version's intended use; None otherwise
        (inside, unknown, or a version that states no range)."""
        if self.intended_use is None:
            return None
        return self.intended_use.age_verdict(reading.years, reading.source)

    def judge_population(self, features: np.ndarray | None) -> list[GateVerdict | None]:
        """Per image, the refusal of the check by pixels, or None (inside, or no check)."""
        if self.population is None or features is None:
            return [None] * (0 if features is None else len(features))
        who = self.intended_use.describe() if self.intended_use else "not stated"
        threshold = self.population.threshold
        return [
            None
            if score <= threshold
            else GateVerdict(
                False,
                UNLIKE_POPULATION,
                "the image looks like a patient this model was not made for (population "
                f"score {score:.2f}, at most {threshold:.2f}); its intended use: {who}",
                float(score),
                threshold,
            )
            for score in self.population.scores(features)
        ]

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 (N, S, S) -> raw logits (N,) and, where the graph has them, the penultimate
        features (N, D), from one ONNX Runtime call."""
        images = np.asarray(images)
        size = self.preprocessing.image_size
        if images.ndim != 3 or images.shape[1:] != (size, size) or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 images of shape (N, {size}, {size})")
        inputs = normalize_uint8(images, self.preprocessing)[:, None]
        outputs = self.session.run(None, {self.input_name: inputs})
        logits = outputs[0].reshape(-1).astype(np.float64)
        features = None if self._features_index is None else outputs[self._features_index]
        return logits, features

    def logits(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S) -> raw logits (N,)."""
        return self.run(images)[0]

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return self.calibration.probabilities(self.logits(images))

    def logits_in_batches(self, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
        """A whole split's raw logits, a bounded batch at a time (ONNX Runtime's memory grows
        with it)."""
        return np.concatenate(
            [
                self.logits(images[start : start + batch_size])
                for start in range(0, len(images), batch_size)
            ]
        )

    def probabilities_in_batches(self, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
        return self.calibration.probabilities(self.logits_in_batches(images, batch_size))

    def predict_prepared(self, images: np.ndarray) -> list[Prediction]:
        return self.predict_with_features(images)[0]

    def predict_with_features(
        self, images: np.ndarray
    ) -> tuple[list[Prediction], np.ndarray | None]:
        """Predictions, and the features the population check reads, from one model run."""
        logits, features = self.run(images)
        return self._predictions(logits), features

    def _predictions(self, logits: np.ndarray) -> list[Prediction]:
        probabilities = self.calibration.probabilities(logits)
        names = self.metadata.class_names
        return [
            Prediction(
                probability=float(p),
                label=names[1] if p >= self.threshold else names[0],
                logit=float(z),
                threshold=self.threshold,
                model_name=self.model_name,
                model_version=self.model_version,
            )
            for z, p in zip(logits, probabilities, strict=True)
        ]

    def predict(self, source: ImageSource | DecodedImage) -> Prediction:
        return self.predict_prepared(self.prepare(source).pixels[None])[0]
