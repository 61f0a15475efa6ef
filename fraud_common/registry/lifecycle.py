"""Champion lifecycle on any registry backend: list, promote, roll back, approve.

These are the functions behind ``fraud-detection models``, ``promote VERSION``, ``rollback`` and
``approve VERSION``; the pipeline's governance step and the canary call the same ones. They use
only the ``ModelRegistry`` interface, so both backends behave alike. What each writes:

* ``promote``: the ``champion`` alias (the old champion is archived), with who and why.
* ``rollback``: the ``champion`` back to the previous one (``base.previous_champion``), and
  ``rolled_back`` (who, when, why) on the version it left.
* ``request_approval`` / ``approve`` / ``wait_for_approval``: ``approval`` on the version:
  ``{"status": "pending" | "approved" | "timed_out", ...}``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from fraud_common.logs import get_logger
from fraud_common.registry.base import (
    ARCHIVED,
    CHALLENGER,
    CHAMPION,
    ModelRegistry,
    ModelVersion,
    RegistryError,
    previous_champion,
)

log = get_logger(__name__)

PENDING, APPROVED, TIMED_OUT = "pending", "approved", "timed_out"
# Seconds between two looks at the registry while waiting for an approval.
APPROVAL_POLL_SECONDS = 5.0


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def refusal(version: ModelVersion) -> str:
    """Why the gates refused ``version`` ("" if they did not)."""
    if version.metadata.get("gate_status") == "refused":
        return str(version.metadata.get("gate_reason") or "refused at the gate")
    if not version.passed_gate:
        return "did not pass the quality gate"
    return ""


def version_status(version: ModelVersion) -> str:
    """One word or two for the listing: champion, challenger, rolled back, archived, refused, ..."""
    approval = version.metadata.get("approval") or {}
    if version.alias == CHALLENGER and approval.get("status") == PENDING:
        return "challenger (awaiting approval)"
    if version.alias:
        return version.alias
    if version.metadata.get("rolled_back"):
        return "rolled back"
    if version.state == ARCHIVED:
        return "archived"
    if refusal(version):
        return "refused"
    if approval.get("status") == TIMED_OUT:
        return "approval timed out"
    return "registered"


@dataclass(frozen=True)
class VersionRow:
    """One line of ``fraud-detection models``."""

    version: str
    alias: str
    status: str
    created_at: str
    roc_auc: float | None
    pr_auc: float | None
    brier: float | None
    data_fingerprint: str
    reason: str  # why it was refused, if it was


def list_models(registry: ModelRegistry, model_name: str) -> list[VersionRow]:
    """Every version of ``model_name``, oldest first, with alias, test metrics, data and status."""
    rows = []
    for version in registry.list_versions(model_name):
        metrics = version.metadata.get("metrics") or {}

        def metric(name: str) -> float | None:
            value = metrics.get(name)
            return float(value) if isinstance(value, (int, float)) else None

        rows.append(
            VersionRow(
                version=version.version,
                alias=version.alias,
                status=version_status(version),
                created_at=version.created_at,
                roc_auc=metric("roc_auc"),
                pr_auc=metric("pr_auc"),
                brier=metric("brier"),
                data_fingerprint=str(version.metadata.get("data_fingerprint", "")),
                reason=refusal(version),
            )
        )
    return rows


def format_models(rows: list[VersionRow]) -> str:
    """The rows as a fixed-width table (what ``fraud-detection models`` prints)."""
    if not rows:
        return "no versions registered"

    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    header = ("VERSION", "ALIAS", "STATUS", "ROC-AUC", "PR-AUC", "BRIER", "DATA", "CREATED", "REASON")
    table = [header] + [
        (r.version, r.alias or "-", r.status, number(r.roc_auc), number(r.pr_auc), number(r.brier),
         r.data_fingerprint[:19] or "-", r.created_at[:19] or "-", r.reason or "")
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths)) + "  " + line[-1]
        for line in table
    ).rstrip()


def promote(registry: ModelRegistry, model_name: str, version: str, actor: str, reason: str,
            force: bool = False) -> ModelVersion:
    """Make ``version`` the champion. A version the gates refused needs ``force``."""
    candidate = registry.get_version(model_name, version)
    why_not = refusal(candidate)
    if why_not and not force:
        raise RegistryError(f"{model_name}:{version} was refused at the gate ({why_not}); pass force (CLI: --force) to override")
    return registry.set_alias(model_name, CHAMPION, version, actor, reason)


def rollback(registry: ModelRegistry, model_name: str, actor: str, reason: str) -> ModelVersion:
    """Give the champion back to the previous one; the version it leaves is marked ``rolled_back``."""
    target = previous_champion(registry.alias_history(model_name))
    if not target:
        raise RegistryError(f"model {model_name!r} has no previous champion to roll back to")
    current = registry.get_version(model_name, alias=CHAMPION)
    restored = registry.set_alias(model_name, CHAMPION, target, actor, reason, kind="rollback")
    registry.update_metadata(model_name, current.version, {"rolled_back": {"by": actor, "at": _now(), "reason": reason}})
    log.info("rolled %s back from %s to %s (%s: %s)", model_name, current.version, target, actor, reason)
    return restored


def request_approval(registry: ModelRegistry, model_name: str, version: str, actor: str) -> ModelVersion:
    """Mark ``version`` as waiting for ``approve``."""
    return registry.update_metadata(
        model_name, version, {"approval": {"status": PENDING, "requested_by": actor, "requested_at": _now()}}
    )


def approve(registry: ModelRegistry, model_name: str, version: str, actor: str, reason: str = "approved") -> ModelVersion:
    """Record a human approval of ``version`` (refused versions cannot be approved)."""
    candidate = registry.get_version(model_name, version)
    why_not = refusal(candidate)
    if why_not:
        raise RegistryError(f"{model_name}:{version} was refused at the gate ({why_not}); nothing to approve")
    approval = dict(candidate.metadata.get("approval") or {})
    if approval.get("status") == TIMED_OUT:
        raise RegistryError(
            f"the approval request of {model_name}:{version} timed out at {approval.get('timed_out_at')}; "
            "promote it by hand instead"
        )
    approval.update(status=APPROVED, approved_by=actor, approved_at=_now(), reason=reason)
    return registry.update_metadata(model_name, version, {"approval": approval})


def wait_for_approval(
    registry: ModelRegistry,
    model_name: str,
    version: str,
    timeout_seconds: float,
    poll_seconds: float = APPROVAL_POLL_SECONDS,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """True once ``version`` is approved; after ``timeout_seconds`` mark it ``timed_out``, False."""
    deadline = clock() + timeout_seconds
    while True:
        approval = registry.get_version(model_name, version).metadata.get("approval") or {}
        if approval.get("status") == APPROVED:
            return True
        if clock() >= deadline:
            break
        sleep(min(poll_seconds, max(deadline - clock(), 0.0)))
    registry.update_metadata(
        model_name, version, {"approval": {**approval, "status": TIMED_OUT, "timed_out_at": _now()}}
    )
    log.warning("no approval of %s:%s within %.0f s", model_name, version, timeout_seconds)
    return False
