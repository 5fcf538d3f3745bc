"""How torch's CPU threads wait for work, decided before torch loads.

torch runs its intra-op work on OpenMP threads. By default a thread that finished its share
of one operation spins, busy-waiting for the next. That is fastest on an idle machine; on a
busy one the spinning threads take the cores from the thread that still has work, and the
whole run slows several times (measured here: one busy process beside a 2-thread run, 3x;
several, 25x on a single optimizer step). With passive waiting a finished thread sleeps and
gives its core back. fedtide chooses passive waiting unless ``OMP_WAIT_POLICY`` is set
already (``OMP_WAIT_POLICY=ACTIVE`` brings spinning back). OpenMP reads the variable once,
when torch loads it, so this runs when ``common``, ``client`` or ``server`` is imported (every
fedtide command and app imports one of them before torch); where torch was imported first
(your own program), torch keeps its policy. The edge SuperNode process, which never loads
torch, imports none of them.
"""

from __future__ import annotations

import os
import sys

WAIT_POLICY = "PASSIVE"


def choose_wait_policy() -> bool:
    """Set passive waiting for torch's OpenMP threads, unless the user chose a policy or torch
    already loaded OpenMP. Returns whether fedtide's choice applies."""
    if "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return False
    os.environ["OMP_WAIT_POLICY"] = WAIT_POLICY
    return True
