"""Acceptance checks: a setting's published pattern, stated as claims and checked on a demo's runs.

Each setting owns its claims (:meth:`zscl.settings.Setting.acceptance`); the thresholds are data
(``configs/demo.yaml``: ``acceptance`` for MTIL, ``settings.<name>.acceptance`` for the others, and a
``quick`` block for the two-method quick runs). A claim reads the runs' summaries (Transfer / Avg / Last, as
``zscl metrics`` computes them) and the initial model's, and compares one number with its threshold:

    value >= threshold   (or > with ``strict``; <= / < with ``upper``)

A claim whose threshold is ``null`` is switched off; a claim about a method that did not run is left out
(and counted in :attr:`Checks.skipped`), so a demo prints only what it checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional


@dataclass
class Scores:
    """What the claims read.

    ``methods``: method name -> its summary (``transfer``, ``avg``, ``last``; a curve has no ``transfer``);
    ``zero_shot``: the initial model's ``transfer`` / ``avg`` / ``last``; ``zero_shot_row``: its accuracy on each
    task (a matrix) and ``chance``: 100 / classes of each task; ``seconds``: method -> its sequence's CPU seconds.
    """

    methods: dict[str, dict[str, Any]]
    zero_shot: dict[str, float]
    zero_shot_row: Optional[list[float]] = None
    chance: Optional[list[float]] = None
    seconds: dict[str, float] = field(default_factory=dict)

    def get(self, who: str, metric: str) -> float:
        """``who``'s ``metric``; ``who`` is a method name or ``zero_shot``."""
        return float(self.zero_shot[metric] if who == "zero_shot" else self.methods[who][metric])


class Checks:
    """The list of checks a setting builds, each ``{"check", "value", "threshold", "passed"}``."""

    def __init__(self, scores: Scores, rules: dict[str, Any]) -> None:
        self.scores, self.rules = scores, rules
        self.items: list[dict[str, Any]] = []
        self.skipped = 0

    def claim(self, name: str, needs: list[str], value: Callable[[], float], threshold: Optional[float],
              strict: bool = False, upper: bool = False) -> None:
        """Check ``value() >= threshold`` (``>`` when strict; ``<=`` / ``<`` when upper). Off when the threshold
        is None; left out when a method of ``needs`` did not run."""
        if threshold is None:
            return
        if any(m != "zero_shot" and m not in self.scores.methods for m in needs):
            self.skipped += 1
            return
        # Rounded to 1e-9: the metrics are means of accuracies taken in different orders (a method's Transfer over
        # its matrix, zero-shot's over its row), so equal accuracies can differ by round-off (-1e-15 is not < 0).
        v = round(float(value()), 9) + 0.0
        if upper:
            passed = v < threshold if strict else v <= threshold
        else:
            passed = v > threshold if strict else v >= threshold
        self.items.append({"check": name, "value": round(v, 2), "threshold": threshold, "passed": bool(passed)})

    def gap(self, name: str, a: str, b: str, metric: str, key: str, strict: bool = False, upper: bool = False,
            sign: float = 1.0) -> None:
        """``a``'s ``metric`` minus ``b``'s (``a`` and ``b``: methods or ``zero_shot``) against ``rules[key]``;
        ``sign = -1`` negates the threshold (a loss of at most ``t`` reads ``gap >= -t``)."""
        t = self.rules.get(key)
        self.claim(name, [a, b], lambda: self.scores.get(a, metric) - self.scores.get(b, metric),
                   None if t is None else sign * float(t) + 0.0, strict=strict, upper=upper)

    def best(self, key: str, metric: str, lowest: bool = False) -> None:
        """``rules[key] = {methods: [...], of: [...]}``: the best ``metric`` of ``methods`` exceeds every one of
        ``of`` (the value is the margin over the best of those); with ``lowest``, the lowest of ``methods`` lies
        below every one of ``of``."""
        rule = self.rules.get(key)
        if not rule:
            return
        if not isinstance(rule, dict) or not {"methods", "of"} <= set(rule):
            raise ValueError(f"acceptance rule {key!r} needs {{methods: [...], of: [...]}}; got {rule!r}")
        group, rivals = list(rule["methods"]), [m for m in rule["of"] if m not in rule["methods"]]
        get, name = self.scores.get, metric.title()
        if lowest:
            self.claim(f"{' / '.join(group)} lowest {name}: lowest of {', '.join(rivals)} - {name}", group + rivals,
                       lambda: min(get(m, metric) for m in rivals) - min(get(m, metric) for m in group), 0.0, strict=True)
        else:
            self.claim(f"{' / '.join(group)} best {name}: {name} - best of {', '.join(rivals)}", group + rivals,
                       lambda: max(get(m, metric) for m in group) - max(get(m, metric) for m in rivals), 0.0, strict=True)

    def room(self) -> None:
        """Room to learn (a matrix): zero-shot Last <= ``zs_last_max``, ``weak_tasks.count`` tasks under
        ``weak_tasks.below`` % zero-shot, every task >= ``chance_ratio_min`` x chance."""
        zs, chance, rules = self.scores.zero_shot_row or [], self.scores.chance or [], self.rules
        self.claim("room to learn: ZS Last <= max", [], lambda: self.scores.zero_shot["last"], rules.get("zs_last_max"),
                   upper=True)
        weak = rules.get("weak_tasks")
        if weak:
            self.claim(f"tasks under {weak['below']:g} % zero-shot", [], lambda: sum(z < weak["below"] for z in zs),
                       weak["count"])
        self.claim("zero-shot / chance on every task (min)", [], lambda: min(z / c for z, c in zip(zs, chance)),
                   rules.get("chance_ratio_min"))

    def per_method(self) -> None:
        """Optional claims per method of a list (X-TAIL's RAIL): ``keeps_zero_shot: {methods, within}``
        (0 <= Transfer - ZS Transfer <= within), ``learns: {methods, min}`` (Last - ZS Last >= min) and
        ``faster: {method, than, ratio}`` (``than``'s sequence CPU seconds / ``method``'s >= ratio)."""
        s = self.scores
        keep = self.rules.get("keeps_zero_shot") or {}
        for m in keep.get("methods", []):
            self.claim(f"{m} keeps zero-shot: Transfer - ZS Transfer >= 0", [m],
                       lambda m=m: s.get(m, "transfer") - s.get("zero_shot", "transfer"), 0.0)
            self.claim(f"{m} stays at zero-shot: Transfer - ZS Transfer <= within", [m],
                       lambda m=m: s.get(m, "transfer") - s.get("zero_shot", "transfer"), keep["within"], upper=True)
        learn = self.rules.get("learns") or {}
        for m in learn.get("methods", []):
            self.claim(f"{m} learns: Last - ZS Last", [m], lambda m=m: s.get(m, "last") - s.get("zero_shot", "last"),
                       learn["min"])
        fast = self.rules.get("faster")
        if fast:
            m, other = fast["method"], fast["than"]
            self.claim(f"{m} faster: {other}'s sequence CPU time / {m}'s", [m, other],
                       lambda: s.seconds[other] / max(s.seconds[m], 1e-9), fast["ratio"])


def failed(checks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The checks that did not pass."""
    return [c for c in checks if c["passed"] is False]
