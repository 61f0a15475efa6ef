"""Logging set up once, the same way in every step."""

from __future__ import annotations

import logging
import sys

_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def setup_logging(level: str = "INFO") -> None:
    """Send log records to stderr with one format; safe to call more than once."""
    root = logging.getLogger()
    # Inside a KFP executor the root logger already has a handler: reuse it, do not double lines.
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        handler._fraud_detection = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level.upper())
    # Third-party libraries that are chatty at INFO.
    for noisy in ("py4j", "urllib3", "botocore", "feast", "tensorflow", "absl"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def get_logger(name: str) -> logging.Logger:
    """A module logger; call ``setup_logging`` once at program start."""
    return logging.getLogger(name)
