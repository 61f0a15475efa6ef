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
