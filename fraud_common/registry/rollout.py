"""The canary's rules and records, whoever splits the traffic (the local predictor or an InferenceGraph).

A canary sends a growing share of traffic to the challenger (``CanaryPolicy.steps``, e.g. 10 →
50 → 100 %). At each step the splitter reports what it saw (``StepStats``) and ``check_step``
applies three checks on the same traffic:

* errors: the challenger's error rate at most the champion's plus ``max_error_rate_increase``;
  shares (errors, flips) are judged on the lower end of their 95 % Wilson interval, so a step
  fails on evidence rather than on the noise of a few dozen requests;
* latency: the challenger's p99 at most ``max_latency_factor`` × the champion's p99 plus
  ``latency_slack_ms`` (sub-millisecond p99s jitter by more than any factor);
* scores: the challenger's score distribution against the champion's on the same requests
  (Wasserstein-1 distance, in probability units, at most ``max_score_distance``) and, where both scored the same rows,
  the share of flipped decisions at most ``max_flip_rate``.

A step with fewer than ``min_requests`` challenger requests in ``step_timeout_seconds`` fails
(no evidence is not a pass). The records go onto the challenger's version as ``canary``:
``{"status": "running"|"promoted"|"rolled_back", "steps": [...], "reason", "started_at",
"finished_at", "policy"}``; a failed canary also writes ``rolled_back`` (who, when, why) and takes
the ``challenger`` alias away, so ``fraud-detection models`` shows it as rolled back.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from fraud_common.registry import lifecycle
from fraud_common.registry.base import CHALLENGER, ModelRegistry, ModelVersion, RegistryError

CANARY_KEY = "canary"
RUNNING, PROMOTED, ROLLED_BACK = "running", "promoted", "rolled_back"
ACTOR = "canary"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def parse_steps(text: str) -> tuple[int, ...]:
    """``"10,50,100"`` → (10, 50, 100): increasing percentages ending at 100."""
    try:
        steps = tuple(int(part) for part in str(text).split(",") if part.strip())
    except ValueError:
        raise ValueError(f"canary steps {text!r} are not comma-separated integers (e.g. 10,50,100)") from None
    if not steps or steps[-1] != 100 or any(not 0 < s <= 100 for s in steps) or list(steps) != sorted(set(steps)):
        raise ValueError(f"canary steps {text!r} must increase from above 0 and end at 100 (e.g. 10,50,100)")
    return steps


@dataclass(frozen=True)
class CanaryPolicy:
    """Every bound the canary applies, and its pace."""

    steps: tuple[int, ...] = (10, 50, 100)
    min_requests: int = 30  # challenger requests a step needs before it is judged
    step_seconds: float = 5.0  # a step lasts at least this long
    step_timeout_seconds: float = 120.0  # and fails if it has too little traffic by then
    max_error_rate_increase: float = 0.01
    max_latency_factor: float = 1.5
    latency_slack_ms: float = 5.0  # scheduler noise on a busy host exceeds any factor of a 0.2 ms p99
    max_score_distance: float = 0.05
    max_flip_rate: float = 0.05

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "steps": list(self.steps)}


@dataclass(frozen=True)
class VersionStats:
    """What one version answered during a step."""

    requests: int
    errors: int
    p99_ms: float

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class StepStats:
    """What the splitter saw during one step (champion and challenger on the same traffic)."""

    percent: int
    seconds: float
    champion: VersionStats
    challenger: VersionStats
    score_distance: float  # Wasserstein-1 distance between the two versions' scores (NaN: no scores)
    flip_rate: float | None = None  # on rows both scored (None: the splitter cannot pair them)
    paired_rows: int = 0


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    value: float
    bound: float
    detail: str


@dataclass
class StepResult:
    percent: int
    stats: StepStats
    checks: list[Check] = field(default_factory=list)
    at: str = field(default_factory=_now)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def reason(self) -> str:
        return "; ".join(c.detail for c in self.checks if not c.passed)

    def to_record(self) -> dict[str, Any]:
        return {
            "percent": self.percent, "passed": self.passed, "at": self.at, "seconds": round(self.stats.seconds, 3),
            "stats": asdict(self.stats), "checks": {c.name: asdict(c) for c in self.checks},
        }


def _at_most(name: str, value: float, bound: float, what: str) -> Check:
    ok = not math.isnan(value) and value <= bound
    return Check(name, ok, float(value), float(bound), f"{what} {value:.4f} {'meets' if ok else 'fails'} <= {bound:.4f}")


def wilson_lower(successes: int, trials: int, z: float = 1.96) -> float:
    """Lower end of the Wilson score interval (95 % by default) of a proportion; 0 without trials."""
    if trials <= 0:
        return 0.0
    p = successes / trials
    centre = p + z * z / (2 * trials)
    spread = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return max(0.0, (centre - spread) / (1 + z * z / trials))


def _share_at_most(name: str, hits: int, trials: int, bound: float, what: str) -> Check:
    """A share judged on the lower end of its 95 % interval: a step fails on evidence, not on noise.

    A few dozen requests cannot tell 4 % from 6 %; they can tell 0 % from 18 %.
    """
    share, lower = hits / trials, wilson_lower(hits, trials)
    ok = lower <= bound
    return Check(name, ok, share, float(bound),
                 f"{what} {share:.4f} (95 % lower bound {lower:.4f}) {'meets' if ok else 'fails'} <= {bound:.4f}")


def check_step(stats: StepStats, policy: CanaryPolicy) -> StepResult:
    """Every check of one step (see the module docstring)."""
    result = StepResult(stats.percent, stats)
    challenger, champion = stats.challenger, stats.champion
    if challenger.requests < policy.min_requests:
        result.checks.append(Check("traffic", False, challenger.requests, policy.min_requests,
                                   f"only {challenger.requests} challenger requests (need {policy.min_requests})"))
        return result
    result.checks.append(_share_at_most("error_rate", challenger.errors, challenger.requests,
                                        champion.error_rate + policy.max_error_rate_increase,
                                        f"challenger error rate ({challenger.errors}/{challenger.requests})"))
    if champion.requests:
        bound = champion.p99_ms * policy.max_latency_factor + policy.latency_slack_ms
        result.checks.append(_at_most("latency_p99", challenger.p99_ms, bound,
                                      f"challenger p99 latency ms (champion {champion.p99_ms:.3f})"))
    # NaN with no champion traffic: a splitter that cannot shadow-score (the cluster's) has
    # nothing to compare at 100 %; the earlier steps compared the distributions.
    comparable = not (math.isnan(stats.score_distance) and champion.requests == 0)
    if challenger.requests > challenger.errors and comparable:
        result.checks.append(_at_most("score_distance", stats.score_distance, policy.max_score_distance,
                                      "score distribution distance (Wasserstein-1) vs champion"))
    if stats.flip_rate is not None and stats.paired_rows:
        flips = round(stats.flip_rate * stats.paired_rows)
        result.checks.append(_share_at_most("flip_rate", flips, stats.paired_rows, policy.max_flip_rate,
                                            f"flipped decisions on {stats.paired_rows} shadow-scored rows"))
    return result


def start(registry: ModelRegistry, model_name: str, version: str, policy: CanaryPolicy, actor: str) -> ModelVersion:
    """Check that ``version`` may be rolled out and mark its canary as running.

    A version refused at the gate cannot start a canary; one not yet challenger becomes it.
    """
    candidate = registry.get_version(model_name, version)
    why_not = lifecycle.refusal(candidate)
    if why_not:
        raise RegistryError(f"{model_name}:{version} was refused at the gate ({why_not}); no canary")
    if candidate.alias == "champion":
        raise RegistryError(f"{model_name}:{version} is already the champion")
    if candidate.alias != CHALLENGER:
        registry.set_alias(model_name, CHALLENGER, version, actor, "canary started")
    record = {"status": RUNNING, "steps": [], "started_at": _now(), "started_by": actor, "policy": policy.to_dict()}
    return registry.update_metadata(model_name, version, {CANARY_KEY: record})


def record_step(registry: ModelRegistry, model_name: str, version: str, result: StepResult) -> None:
    """Append one step's result to the version's canary record."""
    record = dict(registry.get_version(model_name, version).metadata.get(CANARY_KEY) or {})
    record["steps"] = [*record.get("steps", []), result.to_record()]
    registry.update_metadata(model_name, version, {CANARY_KEY: record})


def finish_promoted(registry: ModelRegistry, model_name: str, version: str, actor: str) -> ModelVersion:
    """Every step passed: the version becomes champion (the old one is archived)."""
    record = dict(registry.get_version(model_name, version).metadata.get(CANARY_KEY) or {})
    steps = "→".join(str(s["percent"]) for s in record.get("steps", []))
    registry.update_metadata(model_name, version, {CANARY_KEY: {**record, "status": PROMOTED, "finished_at": _now()}})
    return lifecycle.promote(registry, model_name, version, actor, f"canary passed ({steps} %)")


def finish_rolled_back(registry: ModelRegistry, model_name: str, version: str, actor: str, reason: str) -> None:
    """A step failed (or the canary was stopped): traffic went back to the champion; say so on the version."""
    current = registry.get_version(model_name, version)
    record = dict(current.metadata.get(CANARY_KEY) or {})
    registry.update_metadata(model_name, version, {
        CANARY_KEY: {**record, "status": ROLLED_BACK, "finished_at": _now(), "reason": reason},
        "rolled_back": {"by": actor, "at": _now(), "reason": f"canary: {reason}"},
    })
    if current.alias == CHALLENGER:
        registry.clear_alias(model_name, CHALLENGER, actor, f"canary rolled back: {reason}")


def latency_result(challenger_p99_ms: float, champion_p99_ms: float, factor: float, requests: int = 0) -> dict[str, Any]:
    """The latency gate as recorded on a version (the same fields as every gate result)."""
    if not (champion_p99_ms > 0 and challenger_p99_ms >= 0):
        raise ValueError(f"latency p99s must be positive, got {challenger_p99_ms} and {champion_p99_ms}")
    bound = champion_p99_ms * factor
    ok = challenger_p99_ms <= bound
    under = f" under {requests} requests each" if requests else ""
    return {
        "gate": "latency_p99", "passed": ok, "value": float(challenger_p99_ms), "bound": float(bound),
        "at_least": False, "champion": float(champion_p99_ms),
        "detail": f"p99 latency ms (factor {factor}{under}) {challenger_p99_ms:.4f} "
                  f"{'meets' if ok else 'fails'} <= {bound:.4f} (champion {champion_p99_ms:.4f})",
    }


def record_gate(registry: ModelRegistry, model_name: str, version: str, result: dict[str, Any]) -> ModelVersion:
    """Add one gate result to a version's gates; a failed one refuses the version (with the reason)."""
    current = registry.get_version(model_name, version).metadata
    gates = dict(current.get("gates") or {})
    gates["results"] = {**(gates.get("results") or {}), result["gate"]: result}
    failed = [r["detail"] for r in gates["results"].values() if not r.get("passed")]
    changes: dict[str, Any] = {"gates": gates, "gate_status": "refused" if failed else "passed",
                               "gate_reason": "; ".join(failed)}
    if failed:
        changes["passed_gate"] = False
    return registry.update_metadata(model_name, version, changes)
