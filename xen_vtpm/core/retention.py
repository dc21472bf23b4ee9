"""Which checkpoints `prune` keeps: the retention rules, with no I/O.

The rules are restic's (`restic forget`), stated here because the tests check them against a
calendar built by hand (docs/user-guide.md, "prune", says the same for administrators):

- the checkpoints are taken newest first;
- ``last N`` keeps the N newest;
- ``hourly``/``daily``/``weekly``/``monthly``/``yearly N`` keeps the newest checkpoint of each of
  the N most recent hours, days, ISO weeks, months or years that have one (periods in local time);
- one checkpoint counts for every rule at once: the newest checkpoint of today is the first
  ``daily`` one and the first ``weekly`` one too.  Borg instead applies the rules one after the
  other, and a checkpoint one rule kept does not count for the next, so for the same numbers borg
  keeps more; borg also keeps the oldest checkpoint when a rule finds fewer periods than it asks
  for, which restic and this tool do not;
- a protected candidate (a `keep` mark) is kept whatever the rules say, and counts for them like
  any other, as restic's ``--keep-tag`` does;
- the newest candidate is always kept: every rule keeps it first (and a policy without any rule
  keeps everything, as restic does; the command line refuses one).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from datetime import datetime, tzinfo

from xen_vtpm.model import Checkpoint, PruneEntry, RetentionPolicy

from .steps import SAVE

KEEP_MARK = "keep-mark"          # why a checkpoint marked with `keep` stays
SAVE_BINDING = "save-binding"    # why one a save file is bound to stays (unless the policy includes saves)

# rule -> the period a local time falls in (``last`` has none: every checkpoint is its own).
PERIODS: dict[str, Callable[[datetime], tuple[int, ...]]] = {
    "hourly": lambda t: (t.year, t.month, t.day, t.hour),
    "daily": lambda t: (t.year, t.month, t.day),
    "weekly": lambda t: tuple(t.isocalendar())[:2],
    "monthly": lambda t: (t.year, t.month),
    "yearly": lambda t: (t.year,),
}


@dataclasses.dataclass(frozen=True)
class Candidate:
    id: str
    time: datetime                 # timezone-aware
    protected: str | None = None   # why it stays whatever the rules say ("keep-mark"), or None


def select(candidates: Sequence[Candidate], policy: RetentionPolicy,
           tz: tzinfo | None = None) -> dict[str, tuple[str, ...]]:
    """id -> why each candidate is kept (``"daily #2"``: it opened the second day the daily rule
    kept), or ``()`` for one to remove.  ``tz``: the periods' time zone (None: the host's)."""
    newest_first = sorted(candidates, key=lambda c: (c.time, c.id), reverse=True)
    counts = policy.counts()
    if not any(counts.values()):
        return {c.id: ("no rule given",) for c in newest_first}
    found = {rule: 0 for rule in counts}
    last_period: dict[str, object] = {rule: None for rule in counts}
    out: dict[str, tuple[str, ...]] = {}
    for nth, cand in enumerate(newest_first):
        local = cand.time.astimezone(tz)
        reasons = [cand.protected] if cand.protected else []
        for rule, wanted in counts.items():
            if found[rule] == wanted:
                continue
            period = nth if rule == "last" else PERIODS[rule](local)
            if period != last_period[rule]:
                last_period[rule] = period
                found[rule] += 1
                reasons.append(f"{rule} #{found[rule]}")
        out[cand.id] = tuple(reasons)
    return out


def plan(checkpoints: Sequence[Checkpoint], held: set[str], policy: RetentionPolicy,
         tz: tzinfo | None = None) -> list[PruneEntry]:
    """One VM's checkpoints, newest first, each with why it stays (``rules`` empty: it goes).
    ``held``: the ids marked with `keep`.  The save bindings take no part in the rules unless the
    policy includes them."""
    saves = {c.id for c in checkpoints if c.kind == SAVE and not policy.include_saves}
    reasons = select([Candidate(c.id, datetime.fromisoformat(c.time), KEEP_MARK if c.id in held else None)
                      for c in checkpoints if c.id not in saves], policy, tz)
    reasons.update(dict.fromkeys(saves, (SAVE_BINDING,)))
    return [PruneEntry(c.id, c.name, c.kind, c.time, reasons[c.id])
            for c in sorted(checkpoints, key=lambda c: (c.time, c.id), reverse=True)]
