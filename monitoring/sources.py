"""Finding the data files a monitoring input names: one file or every file under a folder/prefix."""

from __future__ import annotations

from fraud_common import storage
from fraud_common.settings import Settings


def data_files(uri: str, settings: Settings, suffixes: tuple[str, ...]) -> list[str]:
    """The files with one of ``suffixes`` at ``uri``: the file itself, or those under the folder or
    prefix (hidden and temporary names skipped); empty if there are none."""
    if not storage.exists(uri, settings):
        return []
    # An S3 object is also its own prefix's only match; list_files lists under "<key>/".
    files = storage.list_files(uri, settings) or [uri]
    return [f for f in files if f.endswith(suffixes) and not f.replace("\\", "/").rsplit("/", 1)[-1].startswith((".", "_"))]


def prepared_features(settings: Settings) -> str:
    """The prepared features the served model was trained from, on one machine.

    ``<data>/prepared/features`` when ``fraud-detection prepare`` wrote it; else those of the
    newest local pipeline run (``$FRAUD_HOME/runs/*/prepare-data/prepared/features``: the run
    that trained the latest version, normally the one served). Pass ``--reference`` to choose.
    """
    from fraud_common.schemas import FEATURES_DIR

    direct = storage.join(settings.prepared_uri, FEATURES_DIR)
    if storage.exists(direct, settings):
        return direct
    runs = sorted(settings.home.glob(f"runs/*/prepare-data/prepared/{FEATURES_DIR}"), key=lambda p: p.stat().st_mtime)
    return str(runs[-1]) if runs else direct
