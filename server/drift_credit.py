"""Which drift reports earn a reaction: the server's check of a client's word.

A drift reaction hands a reporting client more weight (``--drift-weight``), more local epochs
and everyone's attention (``--react-server``), so a client that reports drift every round
would buy itself influence. A report is **credited** (acted on) only when both hold:

- **evidence**: its ``pre-acc`` (the received global model's accuracy on the client's new
  data, before training) fell by at least ``evidence`` since the same node's last accepted
  reply. A real change of data shows there; a liar must fake a fall, and a fall needs a higher
  value before it, so it cannot show one every round. Or, without a fall of its own, another
  node's report was credited on its own fall in the last ``AGREEMENT_ROUNDS`` rounds: a
  change that reaches clients at different times finds the global model already knowing it
  for the late ones (their inputs changed, their accuracy did not fall), and they are part of
  the same wave;
- **agreement among clients**: the node has no more credited reports than the median node
  (every node the run has heard from, counting zeros). Honest clients meet a few changes each;
  a node that claims far more than its peers stops being credited after one more than them.

A report that fails either is kept in the history as the client said it (``drift-detected``)
with ``drift-credited`` 0, counted (``drift_reports_denied`` in the summary; its reason at
debug level) and earns nothing. ``evidence`` 0 takes the
client's word (every report credited), as before this check existed.

A credited drift is not over in one round: the federation needs a few rounds to learn the new
data. For up to ``follow_rounds`` more replies the node's same-round reactions go on
(``drift-credited`` 1) while its ``pre-acc`` stays below its level before the drift, and end at
the first reply that is back. These rounds are not credits: a node gets at most
``follow_rounds`` of them per credited report. The next-round reaction (``--react-server``)
counts only credited reports, not the rounds that follow them.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

log = logging.getLogger("fedtide.server")

REPORT_KEY, CREDIT_KEY, EVIDENCE_KEY = "drift-detected", "drift-credited", "pre-acc"
AGREEMENT_ROUNDS = 3  # how long a report credited on its own fall vouches for other nodes' reports


class DriftCredit:
    """Judges each accepted reply's drift report; its per-node memory is checkpointed."""

    def __init__(self, evidence: float, follow_rounds: int = 0) -> None:
        self.evidence = evidence
        self.follow_rounds = follow_rounds
        self.last_accuracy: dict[int, float] = {}
        self.credits: dict[int, int] = {}
        self.recovering: dict[int, tuple[float, int]] = {}  # node -> (accuracy before its fall, rounds left)
        self.falls: dict[int, int] = {}  # node -> the last round it had a report credited on its own fall
        self.denied = 0

    def judge(self, server_round: int, node: int, metrics: dict[str, Any], label: str = "") -> dict[str, Any]:
        """``metrics`` with ``drift-credited`` 1 when the reactions act on this reply (a
        credited report, or a round that follows one), else without it (a reported drift
        that is not acted on: 0). A client's own ``drift-credited`` is never kept."""
        metrics = {k: v for k, v in metrics.items() if k != CREDIT_KEY}
        before = self.last_accuracy.get(node)
        now = metrics.get(EVIDENCE_KEY)
        self.credits.setdefault(node, 0)
        if now is not None:
            self.last_accuracy[node] = float(now)
        if metrics.get(REPORT_KEY) != 1:
            return {**metrics, CREDIT_KEY: 1} if self._still_recovering(node, now) else metrics
        fell = before is not None and now is not None and before - float(now) >= self.evidence
        reason = self._refusal(server_round, node, before, now, fell)
        if reason is None:
            self.credits[node] += 1
            if fell and self.evidence:
                self.falls[node] = server_round
            if self.follow_rounds and before is not None:  # a wave's late switcher is followed too
                self.recovering[node] = (before, self.follow_rounds)
            return {**metrics, CREDIT_KEY: 1}
        self.denied += 1
        # routine for a late switcher: counted in the summary, its reason at debug level
        log.debug("round %d: node %s reports drift, not acted on: %s", server_round, label or node, reason)
        return {**metrics, CREDIT_KEY: int(self._still_recovering(node, now))}

    def _still_recovering(self, node: int, now: Any) -> bool:
        """Whether this reply, with no new report, still follows the node's credited drift."""
        if node not in self.recovering:
            return False
        level, left = self.recovering.pop(node)
        if now is None or float(now) >= level:
            return False
        if left > 1:
            self.recovering[node] = (level, left - 1)
        return True

    def _refusal(self, server_round: int, node: int, before: float | None, now: Any, fell: bool) -> str | None:
        if self.evidence == 0:
            return None
        wave = any(server_round - at <= AGREEMENT_ROUNDS for other, at in self.falls.items() if other != node)
        if not fell and not wave:
            if now is None:
                return f"its reply has no '{EVIDENCE_KEY}' to show a change, and no other node's did lately"
            if before is None:
                return "no earlier reply to compare its pre-training accuracy with, and no other node's fell lately"
            return (f"its pre-training accuracy went {before:.3f} -> {float(now):.3f}, not a fall of "
                    f"--drift-evidence {self.evidence:g}, and no other node's fell lately")
        median = float(np.median(list(self.credits.values())))
        if self.credits[node] > median:
            return f"it has {self.credits[node]} credited reports, more than the median node's {median:g}"
        return None

    def state(self) -> dict[str, Any]:
        return {"drift_credit": {
            "last_accuracy": {str(k): v for k, v in self.last_accuracy.items()},
            "credits": {str(k): v for k, v in self.credits.items()}, "denied": self.denied,
            "recovering": {str(k): list(v) for k, v in self.recovering.items()},
            "falls": {str(k): v for k, v in self.falls.items()},
        }}

    def load_state(self, state: dict[str, Any]) -> None:
        if "drift_credit" in state:
            saved = state["drift_credit"]
            self.last_accuracy = {int(k): float(v) for k, v in saved["last_accuracy"].items()}
            self.credits = {int(k): int(v) for k, v in saved["credits"].items()}
            self.denied = int(saved["denied"])
            self.recovering = {int(k): (float(v[0]), int(v[1])) for k, v in saved.get("recovering", {}).items()}
            self.falls = {int(k): int(v) for k, v in saved.get("falls", {}).items()}

    def summary(self) -> dict[str, Any]:
        return {"drift_reports_credited": sum(self.credits.values()), "drift_reports_denied": self.denied}
