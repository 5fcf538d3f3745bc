"""Figures about a drifting stream, beyond the accuracy matrix: how fast a new task is
learned, and how well clients' drift detectors match the real task switches."""

from __future__ import annotations

from typing import Sequence


def rounds_to_recover(
    accuracy: Sequence[float], start: int, end: int, fraction: float = 0.9
) -> int | None:
    """Rounds from ``start`` until accuracy on the new task first reaches ``fraction`` of the
    best it reaches by ``end`` (1 = already in its first round). ``accuracy[r]`` is the
    accuracy after round r (index 0 = before training). None if never reached."""
    window = accuracy[start : end + 1]
    if not window:
        return None
    target = fraction * max(window)
    for offset, value in enumerate(window):
        if value >= target:
            return offset + 1
    return None


def early_accuracy(accuracy: Sequence[float], start: int, rounds: int = 3) -> float | None:
    """Mean accuracy on a new task over its first ``rounds`` rounds from ``start``: how
    quickly the federation picks it up (higher is faster)."""
    window = accuracy[start : start + rounds]
    return sum(window) / len(window) if window else None


def client_recovery_rounds(timelines: dict[int, list[tuple]], fraction: float = 0.9) -> float | None:
    """Mean, over every client task switch, of the replies it takes until the client's
    prequential accuracy on its new data is back to ``fraction`` of what it was just before
    the switch (1 = already in the switch round). A switch never recovered counts as the
    number of replies left. None when there is no switch."""
    counts: list[int] = []
    for timeline in timelines.values():
        for i in range(1, len(timeline)):
            if timeline[i][1] == timeline[i - 1][1]:
                continue
            target = fraction * timeline[i - 1][3]
            following = timeline[i:]
            rounds = next((k + 1 for k, entry in enumerate(following) if entry[3] >= target), len(following))
            counts.append(rounds)
    return sum(counts) / len(counts) if counts else None


def score_detections(timelines: dict[int, list[tuple]], tolerance: int = 1) -> dict[str, float | int | None]:
    """Match each client's drift reports to its task switches, as a detection problem.

    A switch is the first reply in which a client's task id differs from its previous
    reply's (larger in a task sequence; any other concept in distributed drift). It counts as detected when the client reports drift in that reply or
    within ``tolerance`` later replies; the delay is counted in replies (0 = same round).
    Every report that matches no switch is a false alarm. Also: the share of switches found
    within ``tolerance + 1`` replies (a report one reply later still matches then), false
    alarms per 100 client replies, and precision (the share of reports that match a switch;
    None without reports).
    """
    strict, loose = _match(timelines, tolerance), _match(timelines, tolerance + 1)
    replies = sum(len(timeline) for timeline in timelines.values())
    reports = sum(1 for timeline in timelines.values() for entry in timeline if entry[2])
    switches = strict["switches"]
    return {
        "switches": switches,
        "detected": strict["detected"],
        "detection_rate": strict["detected"] / switches if switches else 0.0,
        f"detection_rate_within_{tolerance + 1}": loose["detected"] / switches if switches else 0.0,
        "mean_delay_rounds": sum(strict["delays"]) / len(strict["delays"]) if strict["delays"] else 0.0,
        "false_alarms": strict["false_alarms"],
        "false_alarms_per_100": 100 * strict["false_alarms"] / replies if replies else 0.0,
        "precision": (reports - strict["false_alarms"]) / reports if reports else None,
        "client_rounds": replies,
    }


def _match(timelines: dict[int, list[tuple]], tolerance: int) -> dict:
    switches = detected = false_alarms = 0
    delays: list[int] = []
    for timeline in timelines.values():
        matched: set[int] = set()
        for i in range(1, len(timeline)):
            if timeline[i][1] == timeline[i - 1][1]:
                continue
            switches += 1
            for delay in range(tolerance + 1):
                j = i + delay
                if j < len(timeline) and timeline[j][2] and j not in matched:
                    matched.add(j)
                    detected += 1
                    delays.append(delay)
                    break
        false_alarms += sum(1 for j, entry in enumerate(timeline) if entry[2] and j not in matched)
    return {"switches": switches, "detected": detected, "delays": delays, "false_alarms": false_alarms}
