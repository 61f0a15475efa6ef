"""Record transactions in the cards' histories through a running predictor's push route.

``fraud-detection push --user-id user_0 --amount 42.50 [--date 2025-06-02T10:00:00Z]`` records
one transaction; ``--file history.csv`` records every row of a CSV in the raw history's format
(``user_id``, ``transaction_amount``, ``date_of_transaction``; other columns are ignored), in
batches, in file order. The predictor updates each card's aggregates atomically (see
``rest_predictor.history_store``); the next transaction scored for that card sees them.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Sequence

from fraud_common.settings import Settings

PUSH_PATH = "/v1/transactions"  # the predictor's push route (this module imports no kserve: a light CLI)


class PushError(RuntimeError):
    """The predictor refused a batch or could not be reached."""


def post_batch(url: str, transactions: list[dict], timeout: float = 30.0) -> int:
    """POST one batch; returns how many the predictor recorded."""
    body = json.dumps({"transactions": transactions}).encode()
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(json.loads(response.read())["recorded"])
    except urllib.error.HTTPError as err:
        try:
            reason = json.loads(err.read()).get("error", err.reason)
        except ValueError:
            reason = err.reason
        raise PushError(f"{err.code}: {reason}") from None
    except (urllib.error.URLError, OSError) as err:
        raise PushError(f"cannot reach the predictor at {url}: {err}") from None


def rows_of(path: Path) -> Iterator[dict]:
    """The transactions of a history-format CSV, as push objects."""
    from rest_predictor.transactions import AMOUNT, USER_ID, WHEN

    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {USER_ID, AMOUNT} - set(reader.fieldnames or ())
        if missing:
            raise PushError(f"{path}: no column(s) {', '.join(sorted(missing))}; found {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            try:
                item: dict = {USER_ID: row[USER_ID], AMOUNT: float(row[AMOUNT])}
            except ValueError:
                raise PushError(f"{path}:{line}: {AMOUNT} {row[AMOUNT]!r} is not a number") from None
            if row.get(WHEN):
                item[WHEN] = row[WHEN]
            yield item


def push_all(url: str, items: Iterator[dict], batch_size: int) -> int:
    """Push ``items`` in batches of ``batch_size``; returns how many were recorded."""
    recorded, batch = 0, []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            recorded += post_batch(url, batch)
            batch = []
    if batch:
        recorded += post_batch(url, batch)
    return recorded


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The push command's flags (``fraud-detection push`` adds them to its subcommand)."""
    parser.add_argument("--user-id", help="the card's user id (one transaction)")
    parser.add_argument("--amount", type=float, help="the transaction's amount")
    parser.add_argument("--date", help="when it happened, ISO 8601 (default: now)")
    parser.add_argument("--file", type=Path, help="a CSV in the raw history's format: one transaction per row")
    parser.add_argument("--url", help="predictor base URL (default: http://FRAUD_SERVE_HOST:FRAUD_SERVE_PORT)")
    parser.add_argument("--batch-size", type=int, default=None, help="transactions per request (default: FRAUD_MAX_BATCH_SIZE)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Push what ``args`` names; prints one line; non-zero exit when a batch is refused."""
    from rest_predictor.transactions import AMOUNT, USER_ID, WHEN

    if (args.file is None) == (args.user_id is None):
        print("error: give either --file, or --user-id with --amount", file=sys.stderr)
        return 2
    if args.user_id is not None and args.amount is None:
        print("error: --user-id needs --amount", file=sys.stderr)
        return 2
    base = (args.url or f"http://{settings.serve_host}:{settings.serve_port}").rstrip("/")
    batch_size = args.batch_size or settings.max_batch_size
    started = time.perf_counter()
    try:
        if args.file is not None:
            if not args.file.is_file():
                raise PushError(f"{args.file}: no such file")
            items: Iterator[dict] = rows_of(args.file)
        else:
            one = {USER_ID: args.user_id, AMOUNT: args.amount}
            if args.date:
                one[WHEN] = args.date
            items = iter([one])
        recorded = push_all(base + PUSH_PATH, items, batch_size)
    except PushError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"recorded {recorded} transaction(s) at {base} in {time.perf_counter() - started:.2f}s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``push (--user-id U --amount A [--date T] | --file CSV) [--url URL] [--batch-size N]``."""
    parser = argparse.ArgumentParser(prog="fraud-detection push", description="Record transactions in the cards' histories.")
    add_arguments(parser)
    return run(parser.parse_args(argv), Settings.from_env())


if __name__ == "__main__":
    raise SystemExit(main())
