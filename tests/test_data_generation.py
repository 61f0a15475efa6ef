"""Tests of the synthetic data generator: files, determinism, profile, coherence, atomic output."""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fraud_common import schemas
from synthetic_data_generation import generate as gen

SMALL_USERS = 2_000
PROFILE_USERS = 20_000
ALL_FILES = [file for _, file in schemas.SPLIT_FILES] + [schemas.HISTORY_FILE]
LABEL_TIME = pd.Timestamp(schemas.DEFAULT_LABEL_TIME)


def file_hashes(folder: Path) -> dict[str, str]:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in ALL_FILES}


@pytest.fixture(scope="session")
def small_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("small") / "raw"
    gen.generate(out, users=SMALL_USERS, seed=7, progress=False)
    return out


@pytest.fixture(scope="session")
def profile_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pd.DataFrame]:
    """20k users read back from the CSVs: labels (with user_id) and history (with parsed times)."""
    out = tmp_path_factory.mktemp("profile") / "raw"
    report = gen.generate(out, users=PROFILE_USERS, seed=42, progress=False)
    labels = pd.concat([pd.read_csv(out / file) for _, file in schemas.SPLIT_FILES], ignore_index=True)
    labels[schemas.ENTITY_KEY] = [schemas.user_id(i) for i in range(len(labels))]
    history = pd.read_csv(out / schemas.HISTORY_FILE, engine="pyarrow")  # parses the timestamps too
    for column in ("created", "updated", "date_of_transaction"):
        history[column] = pd.to_datetime(history[column], format="ISO8601", utc=True)
    return {"labels": labels, "history": history, "report": report, "dir": out}


@pytest.fixture(scope="session")
def earlier_stats(profile_data: dict) -> pd.DataFrame:
    """Per-user aggregates of history rows strictly before the label time."""
    history = profile_data["history"]
    earlier = history[history["date_of_transaction"] < LABEL_TIME]
    grouped = earlier.groupby(schemas.ENTITY_KEY)
    stats = pd.DataFrame(
        {
            "n": grouped.size(),
            "median": grouped["transaction_amount"].median(),
            "days_since_last": (LABEL_TIME - grouped["date_of_transaction"].max()).dt.total_seconds() / 86400,
        }
    )
    return profile_data["labels"].join(stats, on=schemas.ENTITY_KEY)


# --- determinism ---------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_bytes(small_dir: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    other = tmp_path / "other"
    gen.generate(again, users=SMALL_USERS, seed=7, progress=False)
    gen.generate(other, users=SMALL_USERS, seed=8, progress=False)
    first, second, third = file_hashes(small_dir), file_hashes(again), file_hashes(other)
    assert first == second
    for name in ALL_FILES:
        assert first[name] != third[name], name


def test_bytes_do_not_depend_on_number_of_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gen, "CHUNK_USERS", 700)  # several chunks even for a small run
    gen.generate(tmp_path / "one", users=SMALL_USERS, seed=3, progress=False, workers=1)
    gen.generate(tmp_path / "two", users=SMALL_USERS, seed=3, progress=False, workers=2)
    assert file_hashes(tmp_path / "one") == file_hashes(tmp_path / "two")


# --- structure -----------------------------------------------------------------------------


def test_columns_exact_and_in_order(small_dir: Path) -> None:
    for _, file in schemas.SPLIT_FILES:
        assert pd.read_csv(small_dir / file, nrows=1).columns.tolist() == list(schemas.LABEL_COLUMNS)
    assert pd.read_csv(small_dir / schemas.HISTORY_FILE, nrows=1).columns.tolist() == list(schemas.HISTORY_COLUMNS)


def test_flags_and_label_written_as_zero_point_zero_or_one(small_dir: Path) -> None:
    lines = (small_dir / "train.csv").read_text().splitlines()[1:]
    flag_cells = {cell for line in lines for cell in line.split(",")[len(schemas.FLOAT_COLUMNS):]}
    assert flag_cells == {"0.0", "1.0"}


def test_row_counts_and_80_10_10_split(small_dir: Path) -> None:
    counts = {file: len(pd.read_csv(small_dir / file)) for _, file in schemas.SPLIT_FILES}
    assert counts == {"train.csv": 1600, "validate.csv": 200, "test.csv": 200}
    # Users are numbered over train, test, validate: the upstream blueprint's order.
    assert gen.split_bounds(1_000_000) == [
        ("train.csv", 0, 800_000),
        ("test.csv", 800_000, 900_000),
        ("validate.csv", 900_000, 1_000_000),
    ]


def test_user_ids_run_over_train_then_test_then_validate(small_dir: Path) -> None:
    """Label row j of test.csv is user_{1600 + j}: its ratio matches that user's earlier history."""
    history = pd.read_csv(small_dir / schemas.HISTORY_FILE)
    when = pd.to_datetime(history["date_of_transaction"], format="ISO8601", utc=True)
    medians = history[when < LABEL_TIME].groupby(schemas.ENTITY_KEY)["transaction_amount"].median()
    chunk = gen.simulate_chunk(7, 0, 0, SMALL_USERS, gen.parse_label_time(schemas.DEFAULT_LABEL_TIME))
    for file, first_user in (("train.csv", 0), ("test.csv", 1600), ("validate.csv", 1800)):
        labels = pd.read_csv(small_dir / file)
        users = [schemas.user_id(first_user + j) for j in range(len(labels))]
        amounts = labels["ratio_to_median_purchase_price"].to_numpy() * medians.loc[users].to_numpy()
        assert np.allclose(amounts, chunk.label_amount[first_user : first_user + len(labels)], rtol=1e-9), file


def test_manifest_records_the_label_time(tmp_path: Path) -> None:
    report = gen.generate(tmp_path / "raw", users=30, seed=4, progress=False, label_time="2024-02-03T04:05:06+00:00")
    manifest = json.loads((tmp_path / "raw" / schemas.RAW_MANIFEST_FILE).read_text())
    assert manifest == {"label_time": "2024-02-03T04:05:06+00:00", "users": 30, "seed": 4}
    assert report.paths[schemas.RAW_MANIFEST_FILE] == tmp_path / "raw" / schemas.RAW_MANIFEST_FILE


def test_report_matches_files(profile_data: dict) -> None:
    report = profile_data["report"]
    assert report.rows[schemas.HISTORY_FILE] == len(profile_data["history"])
    assert sum(report.rows[file] for _, file in schemas.SPLIT_FILES) == PROFILE_USERS
    assert set(report.paths) == set(ALL_FILES) | {schemas.RAW_MANIFEST_FILE}
    assert all(path.parent == profile_data["dir"] for path in report.paths.values())


def test_history_users_contiguous_and_grouped(small_dir: Path) -> None:
    history = pd.read_csv(small_dir / schemas.HISTORY_FILE, usecols=[schemas.ENTITY_KEY])
    order = history[schemas.ENTITY_KEY].drop_duplicates().tolist()
    assert order == [schemas.user_id(i) for i in range(SMALL_USERS)]
    # Grouped: each user's rows are adjacent.
    assert history[schemas.ENTITY_KEY].ne(history[schemas.ENTITY_KEY].shift()).sum() == SMALL_USERS


def test_history_rows_per_user_between_1_and_34(profile_data: dict) -> None:
    per_user = profile_data["history"].groupby(schemas.ENTITY_KEY).size()
    assert len(per_user) == PROFILE_USERS
    assert per_user.min() == 1 and per_user.max() == 34
    assert abs(per_user.mean() - 17.5) < 0.3  # uniform on 1..34


def test_history_values_in_range(profile_data: dict) -> None:
    history = profile_data["history"]
    assert history["transaction_amount"].between(10, 1000).all()
    assert history["transaction_category"].nunique() == 10
    assert history["city"].nunique() == 10
    assert history.groupby("city")["state"].nunique().max() == 1
    tokens = history.groupby(schemas.ENTITY_KEY)["card_token"]
    assert tokens.nunique().max() == 1  # one card per user
    assert tokens.first().nunique() == PROFILE_USERS
    assert uuid.UUID(history["card_token"].iloc[0]).version == 4


def test_timestamps_iso_utc_and_ordered(small_dir: Path) -> None:
    history = pd.read_csv(small_dir / schemas.HISTORY_FILE)
    sample = history["created"].iloc[0]
    assert datetime.fromisoformat(sample).utcoffset().total_seconds() == 0
    times = {c: pd.to_datetime(history[c], format="ISO8601", utc=True) for c in ("created", "updated", "date_of_transaction")}
    assert (times["created"] >= times["date_of_transaction"]).all()
    assert (times["updated"] >= times["created"]).all()
    # Earlier history spans up to about a year.
    span = (LABEL_TIME - times["date_of_transaction"].min()).days
    assert 300 <= span <= 366


def test_some_users_have_rows_after_label_time(profile_data: dict) -> None:
    history = profile_data["history"]
    after = history["date_of_transaction"] > LABEL_TIME
    # Every timestamp of a row is on the same side of the label time.
    for column in ("created", "updated"):
        assert ((history[column] > LABEL_TIME) == after).all()
    per_user_after = after.groupby(history[schemas.ENTITY_KEY]).sum()
    share = (per_user_after > 0).mean()
    assert 0.07 < share < 0.13
    assert per_user_after.max() == 3
    assert profile_data["report"].post_label_rows == int(after.sum())
    # Every user has at least one earlier row, so the ratio has a median to refer to.
    assert (~after).groupby(history[schemas.ENTITY_KEY]).sum().min() >= 1


# --- profile -------------------------------------------------------------------------------


def test_label_marginals_follow_public_profile(profile_data: dict) -> None:
    labels = profile_data["labels"]
    assert abs(labels[schemas.LABEL].mean() - 0.0874) < 0.012
    for flag, rate in {"repeat_retailer": 0.882, "used_chip": 0.350, "used_pin_number": 0.101, "online_order": 0.651}.items():
        assert abs(labels[flag].mean() - rate) < 0.015, flag
    assert abs(labels["distance_from_home"].median() - 9.97) < 0.8
    assert abs(labels["distance_from_home"].quantile(0.75) - 25.7) < 2.5
    assert abs(labels["distance_from_last_transaction"].median() - 1.0) < 0.1
    assert abs(labels["ratio_to_median_purchase_price"].median() - 1.0) < 0.08
    assert abs(labels["ratio_to_median_purchase_price"].quantile(0.75) - 2.10) < 0.2
    assert labels["distance_from_home"].max() > 20 * labels["distance_from_home"].quantile(0.75)  # heavy tail
    assert (labels[list(schemas.FLOAT_COLUMNS)] > 0).all().all()


def test_fraud_directions_of_effect(profile_data: dict) -> None:
    labels = profile_data["labels"]
    fraud = labels[schemas.LABEL]
    assert fraud[labels["ratio_to_median_purchase_price"] > 4].mean() > 3 * fraud.mean()
    assert fraud[labels["online_order"] == 1].mean() > 2 * fraud[labels["online_order"] == 0].mean()
    assert fraud[labels["used_pin_number"] == 1].mean() < 0.3 * fraud[labels["used_pin_number"] == 0].mean()
    far = labels["distance_from_home"] > labels["distance_from_home"].quantile(0.9)
    assert fraud[far].mean() > 2 * fraud.mean()
    # Not a deterministic rule: fraud also occurs among ordinary-looking purchases.
    assert 0 < fraud[labels["ratio_to_median_purchase_price"] < 1].mean() < fraud.mean()


# --- coherence with the history ------------------------------------------------------------


def test_ratio_equals_label_amount_over_median_of_earlier_amounts(earlier_stats: pd.DataFrame) -> None:
    implied_cents = earlier_stats["ratio_to_median_purchase_price"] * earlier_stats["median"] * 100
    # The label amount is a whole number of cents: only the true earlier median makes it so.
    assert np.allclose(implied_cents, implied_cents.round(), atol=1e-6)
    # And it is the amount the generator drew for the label transaction.
    chunk = gen.simulate_chunk(42, 0, 0, min(gen.CHUNK_USERS, PROFILE_USERS), gen.parse_label_time(schemas.DEFAULT_LABEL_TIME))
    head = earlier_stats.iloc[: len(chunk.label_amount)]
    assert np.allclose(head["ratio_to_median_purchase_price"] * head["median"], chunk.label_amount, rtol=1e-9)


def test_history_features_carry_fraud_signal(earlier_stats: pd.DataFrame) -> None:
    fraud = earlier_stats[schemas.LABEL] == 1
    assert earlier_stats.loc[fraud, "n"].mean() < earlier_stats.loc[~fraud, "n"].mean() - 0.8
    assert earlier_stats.loc[fraud, "days_since_last"].mean() > 1.5 * earlier_stats.loc[~fraud, "days_since_last"].mean()
    ratio_rank = earlier_stats["ratio_to_median_purchase_price"].rank()
    assert np.corrcoef(ratio_rank, earlier_stats[schemas.LABEL])[0, 1] > 0.2


# --- atomic output, errors, CLI ------------------------------------------------------------


def test_existing_output_replaced_on_success_and_no_temp_left(tmp_path: Path) -> None:
    out = tmp_path / "raw"
    out.mkdir()
    (out / "train.csv").write_text("old\n")
    (out / "notes.txt").write_text("keep me\n")
    gen.generate(out, users=50, seed=1, progress=False)
    assert (out / "train.csv").read_text() != "old\n"
    assert (out / "notes.txt").read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_failed_run_leaves_existing_output_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "raw"
    gen.generate(out, users=50, seed=1, progress=False)
    before = file_hashes(out)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(gen, "label_table", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        gen.generate(out, users=50, seed=2, progress=False)
    assert file_hashes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_bad_arguments_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="users=3"):
        gen.generate(tmp_path / "raw", users=3, progress=False)
    with pytest.raises(ValueError, match="no time zone"):
        gen.generate(tmp_path / "raw", users=50, progress=False, label_time="2025-06-01T00:00:00")
    with pytest.raises(ValueError, match="not an ISO 8601"):
        gen.generate(tmp_path / "raw", users=50, progress=False, label_time="yesterday")
    assert not (tmp_path / "raw").exists()


def test_main_writes_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert gen.main(["--users", "40", "--out", str(tmp_path / "raw"), "--seed", "5", "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == sorted(ALL_FILES + [schemas.RAW_MANIFEST_FILE])
    assert "40 users" in capsys.readouterr().out


def test_progress_bar_counts_users(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gen.generate(tmp_path / "raw", users=60, seed=1, progress=True)
    assert "60/60" in capsys.readouterr().err


def test_main_defaults_to_the_settings_data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRAUD_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FRAUD_DATA_URI", raising=False)
    assert gen.main(["--users", "20", "--no-progress"]) == 0
    assert (tmp_path / "home" / "data" / "raw" / schemas.HISTORY_FILE).exists()
