"""Column names and types shared by every step: the contracts between them."""

from __future__ import annotations

# Label sets (train.csv, validate.csv, test.csv): the public card-transaction data set's columns.
FLOAT_COLUMNS: tuple[str, ...] = (
    "distance_from_home",
    "distance_from_last_transaction",
    "ratio_to_median_purchase_price",
)
FLAG_COLUMNS: tuple[str, ...] = ("repeat_retailer", "used_chip", "used_pin_number", "online_order")
LABEL = "fraud"
LABEL_COLUMNS: tuple[str, ...] = FLOAT_COLUMNS + FLAG_COLUMNS + (LABEL,)

# Label files in the order their rows are numbered: row i overall belongs to user_{i}, txn_{i}.
# Train, test, validate: the upstream Kubeflow fraud-detection blueprint numbers users in this
# order, so its history files join to the same rows here.
SPLIT_FILES: tuple[tuple[str, str], ...] = (
    ("train", "train.csv"),
    ("test", "test.csv"),
    ("valid", "validate.csv"),
)
HISTORY_FILE = "raw_transaction_datasource.csv"
# Written by our generator beside the CSVs: {"label_time": ISO 8601, "users": n, "seed": s}.
# Optional: preparation infers a label time from the history without it.
RAW_MANIFEST_FILE = "generation.json"
HISTORY_COLUMNS: tuple[str, ...] = (
    "user_id",
    "created",
    "updated",
    "date_of_transaction",
    "transaction_amount",
    "transaction_category",
    "card_token",
    "city",
    "state",
)

# Point-in-time aggregates over a user's history strictly before the label's timestamp.
HISTORY_FEATURES: tuple[str, ...] = (
    "num_prev_transactions",
    "avg_prev_transaction_amount",
    "max_prev_transaction_amount",
    "stdv_prev_transaction_amount",
    "days_since_last_transaction",
    "days_since_first_transaction",
)

ENTITY_KEY = "user_id"
TRANSACTION_KEY = "transaction_id"
EVENT_TIMESTAMP = "created"
CREATED_TIMESTAMP = "updated"
SET_COLUMN = "set"
SPLITS: tuple[str, ...] = ("train", "valid", "test")

# The model's inputs, in the model's order. The ONNX graph takes them raw (flags as 0/1);
# the Feast feature service lists exactly these.
MODEL_FEATURES: tuple[str, ...] = FLOAT_COLUMNS + FLAG_COLUMNS + HISTORY_FEATURES

# Prepared Parquet: one row per label row.
PREPARED_COLUMNS: tuple[str, ...] = (
    ENTITY_KEY,
    TRANSACTION_KEY,
    SET_COLUMN,
    LABEL,
    EVENT_TIMESTAMP,
    CREATED_TIMESTAMP,
) + FLOAT_COLUMNS + FLAG_COLUMNS + HISTORY_FEATURES

# File and folder names under <data_uri>/prepared.
FEATURES_DIR = "features"  # Parquet dataset: PREPARED_COLUMNS
ENTITIES_DIR = "entities"  # Parquet dataset: user_id, created, set, fraud (Feast entity rows)
ENTITY_COLUMNS: tuple[str, ...] = (ENTITY_KEY, EVENT_TIMESTAMP, SET_COLUMN, LABEL)


def user_id(index: int) -> str:
    """The user owning label row ``index`` (counted over ``SPLIT_FILES``: train, test, validate)."""
    return f"user_{index}"


def transaction_id(index: int) -> str:
    """The transaction of label row ``index``."""
    return f"txn_{index}"
DEFAULT_LABEL_TIME = "2025-06-01T00:00:00+00:00"  # the generator's default label time (UTC)
