"""The Keras network and its in-graph preprocessing.

Preprocessing (log1p of heavy-tailed features, then standardisation with train-split statistics)
lives inside the model as constants, so the exported ONNX graph takes raw feature values and has a
single input. ``keras.layers.Normalization`` is deliberately not used: on TF 2.21 its statistics
turn into extra ONNX graph inputs.
"""

from __future__ import annotations

from typing import Sequence

import keras
import numpy as np
from keras import ops

from fraud_common import schemas

# Features whose raw values span orders of magnitude (distances, ratio, amounts): the network sees
# log1p(x), which keeps a handful of extreme rows from dominating the standardised scale.
LOG_FEATURES: frozenset[str] = frozenset(
    schemas.FLOAT_COLUMNS
    + (
        "avg_prev_transaction_amount",
        "max_prev_transaction_amount",
        "stdv_prev_transaction_amount",
    )
)

INPUT_NAME = "features"
OUTPUT_NAME = "probability"
# The last dense layer's output, before the sigmoid: what calibration maps (train.calibrate).
LOGIT_LAYER = "logit"


def log_mask(feature_names: Sequence[str]) -> list[bool]:
    """Which inputs get log1p, in model order."""
    return [name in LOG_FEATURES for name in feature_names]


def transform_features(features: np.ndarray, mask: Sequence[bool]) -> np.ndarray:
    """The same log1p the graph applies, in numpy (used to compute the statistics)."""
    out = features.astype(np.float64, copy=True)
    columns = np.flatnonzero(np.asarray(mask, dtype=bool))
    out[:, columns] = np.log1p(np.maximum(out[:, columns], 0.0))
    return out


def standardisation_stats(transformed: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-feature mean and std; a constant feature gets std 1 so it maps to 0, not NaN."""
    mean = transformed.mean(axis=0)
    std = transformed.std(axis=0)
    std = np.where(std > 1e-9, std, 1.0)
    return mean.tolist(), std.tolist()


@keras.saving.register_keras_serializable(package="fraud_detection")
class BakedPreprocessing(keras.layers.Layer):
    """log1p on masked inputs, then ``(x - mean) / std`` with the statistics as graph constants."""

    def __init__(
        self, log_mask: Sequence[bool], mean: Sequence[float], std: Sequence[float], **kwargs
    ) -> None:
        super().__init__(**kwargs)
        if not len(log_mask) == len(mean) == len(std):
            raise ValueError("log_mask, mean and std must have one entry per feature")
        self.log_mask = [bool(v) for v in log_mask]
        self.mean = [float(v) for v in mean]
        self.std = [float(v) for v in std]

    def call(self, inputs):  # noqa: ANN001, ANN201 - Keras tensors
        mask = ops.convert_to_tensor(np.asarray(self.log_mask, dtype=bool))
        mean = ops.convert_to_tensor(np.asarray(self.mean, dtype=np.float32))
        scale = ops.convert_to_tensor(1.0 / np.asarray(self.std, dtype=np.float32))
        # log(1 + x) written out: ONNX has no Log1p, and the values are small enough here.
        logged = ops.log(ops.maximum(inputs, 0.0) + 1.0)
        chosen = ops.where(mask, logged, inputs)
        return (chosen - mean) * scale

    def compute_output_shape(self, input_shape):  # noqa: ANN001, ANN201
        return input_shape

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"log_mask": self.log_mask, "mean": self.mean, "std": self.std})
        return config


def build_network(
    feature_names: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    hidden_units: Sequence[int],
    dropout: float = 0.0,
) -> keras.Model:
    """Raw features ``[batch, n]`` → preprocessing → dense ReLU layers → logit → sigmoid ``[batch, 1]``."""
    inputs = keras.Input(shape=(len(feature_names),), dtype="float32", name=INPUT_NAME)
    hidden = BakedPreprocessing(log_mask(feature_names), mean, std, name="preprocessing")(inputs)
    for index, units in enumerate(hidden_units):
        hidden = keras.layers.Dense(units, activation="relu", name=f"dense_{index}")(hidden)
        if dropout > 0:
            hidden = keras.layers.Dropout(dropout, name=f"dropout_{index}")(hidden)
    logit = keras.layers.Dense(1, name=LOGIT_LAYER)(hidden)
    outputs = keras.layers.Activation("sigmoid", name=OUTPUT_NAME)(logit)
    return keras.Model(inputs=inputs, outputs=outputs, name="fraud_detector")


def logit_model(model: keras.Model) -> keras.Model:
    """The same network without its final sigmoid: raw features → logit ``[batch, 1]``."""
    return keras.Model(inputs=model.input, outputs=model.get_layer(LOGIT_LAYER).output, name="fraud_logit")


def predict_scores(model: keras.Model, features: np.ndarray, batch_size: int = 16_384) -> np.ndarray:
    """The model's single output (the raw, uncalibrated probability) as a 1-D float64 array."""
    if len(features) == 0:
        return np.zeros(0)
    scores = model.predict(np.asarray(features, dtype=np.float32), batch_size=batch_size, verbose=0)
    return np.asarray(scores, dtype=np.float64).reshape(-1)


def predict_logits(model: keras.Model, features: np.ndarray, batch_size: int = 16_384) -> np.ndarray:
    """The network's logits (float32 as the graph computes them, returned as 1-D float64)."""
    return predict_scores(logit_model(model), features, batch_size)
