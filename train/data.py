"""The training data set: loading, checking and turning it into arrays.

The retrieval step writes one frame (Parquet) with ``user_id``, ``created``, ``set``
(``train``/``valid``/``test``), ``fraud`` and the model's features in ``schemas.MODEL_FEATURES``.
Everything here fails with a message naming the file, column and an example value.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fraud_common import schemas

FEATURE_NAMES: tuple[str, ...] = schemas.MODEL_FEATURES


class DatasetError(ValueError):
    """The training frame cannot be used as it is."""


@dataclass(frozen=True)
class Split:
    """One split as arrays: features (float32, model order) and labels (0/1 int8)."""

    features: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def load_dataset(path: Path) -> pd.DataFrame:
    """Read the retrieval output (a Parquet file or folder) and check it."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"training dataset {path} does not exist")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise DatasetError(f"training dataset {path} is not readable Parquet: {exc}") from exc
    validate_frame(frame, source=str(path))
    return frame


def validate_frame(frame: pd.DataFrame, source: str = "training frame") -> None:
    """Raise ``DatasetError`` unless ``frame`` has usable labels, splits and features."""
    needed = (schemas.SET_COLUMN, schemas.LABEL) + FEATURE_NAMES
    missing = [name for name in needed if name not in frame.columns]
    if missing:
        raise DatasetError(f"{source}: missing columns {missing} (has {list(frame.columns)})")
    unknown_sets = sorted(set(frame[schemas.SET_COLUMN].astype(str).unique()) - set(schemas.SPLITS))
    if unknown_sets:
        raise DatasetError(
            f"{source}: column {schemas.SET_COLUMN!r} holds {unknown_sets[:3]}; "
            f"expected one of {list(schemas.SPLITS)}"
        )
    for split in schemas.SPLITS:
        if not (frame[schemas.SET_COLUMN] == split).any():
            raise DatasetError(f"{source}: split {split!r} has no rows")
    _check_labels(frame[schemas.LABEL], source)
    for name in FEATURE_NAMES:
        _check_feature(frame[name], source)


def _check_labels(labels: pd.Series, source: str) -> None:
    values = pd.to_numeric(labels, errors="coerce")
    bad = labels[values.isna() | ~values.isin([0, 1])]
    if len(bad):
        raise DatasetError(
            f"{source}: column {schemas.LABEL!r} must be 0/1 or bool, found {bad.iloc[0]!r} "
            f"in {len(bad)} rows"
        )


def _check_feature(column: pd.Series, source: str) -> None:
    if not (pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column)):
        raise DatasetError(
            f"{source}: feature {column.name!r} has type {column.dtype}, expected numbers or bools "
            f"(example {column.iloc[0]!r})"
        )
    values = column.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(values)
    if bad.any():
        raise DatasetError(
            f"{source}: feature {column.name!r} has {int(bad.sum())} missing or infinite values "
            f"(first at row {int(np.argmax(bad))})"
        )
    if (values < 0).any():
        # Every model input is a distance, ratio, flag, count, amount or age: never negative.
        raise DatasetError(
            f"{source}: feature {column.name!r} has negative values (example {values[values < 0][0]!r})"
        )


def feature_matrix(frame: pd.DataFrame) -> np.ndarray:
    """The model inputs as float32 in model order; bools become 0.0/1.0."""
    return np.column_stack(
        [frame[name].to_numpy(dtype=np.float32) for name in FEATURE_NAMES]
    ).astype(np.float32, copy=False)


def label_vector(frame: pd.DataFrame) -> np.ndarray:
    """The label as 0/1 int8."""
    return frame[schemas.LABEL].to_numpy(dtype=np.int8)


def split_arrays(frame: pd.DataFrame) -> dict[str, Split]:
    """Arrays for each of train, valid and test."""
    out: dict[str, Split] = {}
    sets = frame[schemas.SET_COLUMN].to_numpy()
    for split in schemas.SPLITS:
        part = frame.loc[sets == split]
        out[split] = Split(features=feature_matrix(part), labels=label_vector(part))
    return out
