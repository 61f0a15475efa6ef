"""Export the Keras network to ONNX and check the file with onnxruntime.

The artifact contract (docs/architecture.md): one float32 input ``features`` ``[batch, n]`` of raw
values in model order, one output ``[batch, 1]`` probability, and ``metadata_props``
``feature_names`` (JSON list) and ``threshold`` (decimal string).

With a calibration (``train.calibrate``) the network is converted up to its logit and the
calibration map is appended as plain ONNX nodes with constant parameters, so the file's output is
the calibrated probability; ``metadata_props`` then also carry ``calibration`` (JSON).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Sequence

import keras
import numpy as np
import onnx

from fraud_common.logs import get_logger
from train.calibrate import Calibration
from train.model import INPUT_NAME, OUTPUT_NAME, logit_model

LOGIT_NAME = "logit"

log = get_logger(__name__)

OPSET = 17


class ExportError(RuntimeError):
    """The ONNX file could not be produced or does not behave like the Keras model."""


def to_onnx_proto(model: keras.Model, n_features: int, output_name: str = OUTPUT_NAME) -> onnx.ModelProto:
    """Convert through a ``tf.function`` with a fixed signature (robust for Keras 3 models)."""
    import tensorflow as tf
    import tf2onnx

    signature = (tf.TensorSpec((None, n_features), tf.float32, name=INPUT_NAME),)

    @tf.function(input_signature=signature)
    def serve(features):  # noqa: ANN001, ANN202 - TF tensors
        return {output_name: model(features, training=False)}

    # tf2onnx logs every optimiser pass at INFO; keep our log readable.
    logging.getLogger("tf2onnx").setLevel(max(logging.WARNING, logging.getLogger().level))
    proto, _ = tf2onnx.convert.from_function(serve, input_signature=signature, opset=OPSET)
    # Name the free dimension: servers and readers see "batch" instead of "unk__15".
    for value in list(proto.graph.input) + list(proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    return proto


def append_calibration(proto: onnx.ModelProto, calibration: Calibration) -> None:
    """Replace the graph's logit output by ``calibration``'s probability (nodes appended in place)."""
    graph = proto.graph
    (logit,) = graph.output
    if logit.name != LOGIT_NAME:
        raise ExportError(f"expected the graph to end in {LOGIT_NAME!r}, found {logit.name!r}")
    nodes, constants = calibration.onnx_nodes(LOGIT_NAME, OUTPUT_NAME)
    graph.node.extend(nodes)
    graph.initializer.extend(constants)
    output = onnx.ValueInfoProto()
    output.CopyFrom(logit)
    output.name = OUTPUT_NAME
    del graph.output[:]
    graph.output.append(output)


def add_metadata(
    proto: onnx.ModelProto,
    feature_names: Sequence[str],
    threshold: float,
    calibration: Calibration | None = None,
) -> None:
    """Write the feature order, decision threshold (and calibration) into ``metadata_props``."""
    values = {"feature_names": json.dumps(list(feature_names)), "threshold": repr(float(threshold))}
    if calibration is not None:
        summary = {k: v for k, v in calibration.to_dict().items() if k in ("method", "slope", "intercept", "knots")}
        values["calibration"] = json.dumps({**summary, "fitted_on": "valid"})
    kept = [p for p in proto.metadata_props if p.key not in values]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in values.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def export_onnx(
    model: keras.Model,
    feature_names: Sequence[str],
    threshold: float,
    path: Path,
    calibration: Calibration | None = None,
) -> Path:
    """Write ``model`` (calibrated if given) as ONNX to ``path`` via a temporary file, verified."""
    path = Path(path)
    if not 0.0 <= float(threshold) <= 1.0:
        raise ExportError(f"threshold {threshold!r} is not a probability")
    n_features = len(feature_names)
    if model.inputs[0].shape[-1] != n_features:
        raise ExportError(
            f"model takes {model.inputs[0].shape[-1]} inputs but {n_features} feature names were given"
        )
    if calibration is None:
        proto = to_onnx_proto(model, n_features)
    else:
        proto = to_onnx_proto(logit_model(model), n_features, output_name=LOGIT_NAME)
        append_calibration(proto, calibration)
    add_metadata(proto, feature_names, threshold, calibration)
    onnx.checker.check_model(proto)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    temp = Path(temp_name)
    try:
        onnx.save_model(proto, temp)
        verify_onnx(temp, model, n_features, calibration=calibration)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    log.info("exported ONNX model to %s (%d bytes)", path, path.stat().st_size)
    return path


def onnx_scores(path: Path, features: np.ndarray) -> np.ndarray:
    """Run the ONNX file with onnxruntime; returns ``[batch, 1]`` float32 probabilities."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {INPUT_NAME: np.asarray(features, dtype=np.float32)})
    return output


def read_metadata(path: Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file as a dict."""
    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def offline_scores(model: keras.Model, features: np.ndarray, calibration: Calibration | None = None) -> np.ndarray:
    """What the exported graph should output for ``features``, computed with Keras and numpy."""
    values = np.asarray(features, dtype=np.float32)
    if calibration is None:
        return np.asarray(model(values, training=False), dtype=np.float64)
    return calibration.apply(np.asarray(logit_model(model)(values, training=False)))


def verify_onnx(
    path: Path,
    model: keras.Model,
    n_features: int,
    tolerance: float = 1e-5,
    calibration: Calibration | None = None,
) -> None:
    """Check the graph's interface and that it scores a probe batch like the (calibrated) model."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if [i.name for i in inputs] != [INPUT_NAME] or inputs[0].shape[-1] != n_features:
        raise ExportError(
            f"{path}: expected one input {INPUT_NAME!r} [batch, {n_features}], "
            f"found {[(i.name, i.shape) for i in inputs]}"
        )
    if len(outputs) != 1:
        raise ExportError(f"{path}: expected one output, found {[o.name for o in outputs]}")
    # Raw-looking values across several orders of magnitude, flags included by chance.
    rng = np.random.default_rng(0)
    probe = (rng.lognormal(1.0, 2.0, size=(64, n_features)) * (rng.random((64, n_features)) > 0.2))
    probe = probe.astype(np.float32)
    expected = offline_scores(model, probe, calibration)
    (got,) = session.run(None, {INPUT_NAME: probe})
    if got.shape != (64, 1):
        raise ExportError(f"{path}: output has shape {got.shape}, expected (64, 1)")
    worst = float(np.max(np.abs(got - expected)))
    if worst > tolerance:
        raise ExportError(f"{path}: ONNX and offline scores differ by up to {worst:.2e}")
