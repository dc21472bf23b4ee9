"""The prune rules (xen_vtpm/core/retention.py) against calendars of checkpoints built by hand, and as
properties over generated calendars checked against a second, set-based statement of the same rules.

The rules (docs/user-guide.md, "prune"): newest first; `last N` keeps the N newest; `daily N` keeps the
newest checkpoint of each of the N most recent days that have one (hourly, weekly = ISO week, monthly,
yearly alike); one checkpoint counts for every rule at once; a `keep` mark keeps a checkpoint whatever
the rules say; the periods are local time.
"""
from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xen_vtpm.config import Config
from xen_vtpm.core.retention import Candidate, plan, select
from xen_vtpm.errors import ConfigError
from xen_vtpm.model import Checkpoint, CheckpointMeta, RetentionPolicy

UTC = dt.UTC


def at(text: str, tz: dt.tzinfo = UTC) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=tz)


def cal(*times: str) -> list[Candidate]:
    """Checkpoints named after their time."""
    return [Candidate(t, at(t)) for t in times]


def kept(result: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    return {k: v for k, v in result.items() if v}


# --- hand-built calendars -------------------------------------------------------------------------------
# Two months of a host that snapshots at 02:00 and 14:00, with the 14:00 run missing on some days.
MONTHS = [f"2026-{m:02d}-{d:02d}T{h}" for m, days in ((10, 31), (11, 30)) for d in range(1, days + 1)
          for h in ("02:00:00", "14:00:00") if not (h == "14:00:00" and d % 5 == 0)]


def test_keep_last_keeps_exactly_the_newest():
    res = select(cal(*MONTHS), RetentionPolicy(keep_last=3), tz=UTC)
    # Nov 30 has no 14:00 run (30 % 5 == 0)
    assert kept(res) == {"2026-11-30T02:00:00": ("last #1",), "2026-11-29T14:00:00": ("last #2",),
                         "2026-11-29T02:00:00": ("last #3",)}


def test_daily_weekly_monthly_on_two_months():
    """Worked by hand: Nov 30 is a Monday (ISO week 2026-W49); its 14:00 run is missing (30 % 5 == 0)."""
    res = select(cal(*MONTHS), RetentionPolicy(keep_daily=3, keep_weekly=3, keep_monthly=3), tz=UTC)
    assert kept(res) == {
        # the newest checkpoint of each of the 3 newest days; Nov 30 also opens week 49 and November
        "2026-11-30T02:00:00": ("daily #1", "weekly #1", "monthly #1"),
        "2026-11-29T14:00:00": ("daily #2", "weekly #2"),     # Sunday: the newest of week 48
        "2026-11-28T14:00:00": ("daily #3",),
        "2026-11-22T14:00:00": ("weekly #3",),                # Sunday of week 47
        "2026-10-31T14:00:00": ("monthly #2",),               # October's newest; there is no third month
    }


def test_hourly_and_a_missing_hour():
    res = select(cal("2026-05-01T10:05:00", "2026-05-01T10:40:00", "2026-05-01T12:10:00",
                     "2026-05-01T12:50:00", "2026-05-01T13:00:00"), RetentionPolicy(keep_hourly=3), tz=UTC)
    # hours 13, 12 and 10 (11 has none); the newest of each
    assert kept(res) == {"2026-05-01T13:00:00": ("hourly #1",), "2026-05-01T12:50:00": ("hourly #2",),
                         "2026-05-01T10:40:00": ("hourly #3",)}


def test_iso_week_spans_the_new_year_and_yearly_does_not():
    """2026-12-31 (Thu) and 2027-01-01 (Fri) are both in ISO week 2026-W53."""
    res = select(cal("2026-12-28T09:00:00", "2026-12-31T09:00:00", "2027-01-01T09:00:00"),
                 RetentionPolicy(keep_weekly=5, keep_yearly=5), tz=UTC)
    assert kept(res) == {"2027-01-01T09:00:00": ("weekly #1", "yearly #1"),
                         "2026-12-31T09:00:00": ("yearly #2",)}
    assert res["2026-12-28T09:00:00"] == ()


def test_periods_are_local_time():
    """23:30 and 00:30 UTC are one day at UTC-5 (18:30 and 19:30) and two days in UTC."""
    times = ("2026-03-10T23:30:00", "2026-03-11T00:30:00")
    assert len(kept(select(cal(*times), RetentionPolicy(keep_daily=7), tz=UTC))) == 2
    new_york_winter = dt.timezone(dt.timedelta(hours=-5))
    assert kept(select(cal(*times), RetentionPolicy(keep_daily=7), tz=new_york_winter)) == \
        {"2026-03-11T00:30:00": ("daily #1",)}


def test_a_kept_mark_is_kept_and_counts_for_the_rules():
    cands = cal("2026-01-01T10:00:00", "2026-01-02T10:00:00", "2026-01-02T11:00:00", "2026-01-03T10:00:00")
    cands[2] = dataclasses.replace(cands[2], protected="keep-mark")   # the newest of Jan 2
    cands[0] = dataclasses.replace(cands[0], protected="keep-mark")
    res = select(cands, RetentionPolicy(keep_daily=2), tz=UTC)
    assert kept(res) == {"2026-01-03T10:00:00": ("daily #1",),
                         "2026-01-02T11:00:00": ("keep-mark", "daily #2"),
                         "2026-01-01T10:00:00": ("keep-mark",)}


def test_a_policy_without_rules_keeps_everything():
    assert all(select(cal(*MONTHS[:5]), RetentionPolicy(), tz=UTC).values())


def _ckpt(name: str, kind: str, time: str) -> Checkpoint:
    meta = CheckpointMeta(kind=kind, vtpm_uuid="v", vtpm_backend="vtpm-g", manager_checkpoint=name,
                          manager_hash=None, slot_hashes=("", ""))
    return Checkpoint(id=name, name=name, vm_uuid="u", vm_name="g", time=time, size=1, stored_bytes=1, meta=meta)


def test_plan_sets_save_bindings_aside_unless_the_policy_includes_them():
    ckpts = [_ckpt("old", "snapshot", "2026-01-01T10:00:00Z"), _ckpt("kept", "pre-rollback", "2026-01-02T10:00:00Z"),
             _ckpt("saved", "save", "2026-01-03T10:00:00Z")]
    plan_ = plan(ckpts, {"kept"}, RetentionPolicy(keep_last=1), tz=UTC)
    assert [(e.name, e.rules) for e in plan_] == [("saved", ("save-binding",)), ("kept", ("keep-mark", "last #1")),
                                                  ("old", ())]
    plan_ = plan(ckpts, set(), RetentionPolicy(keep_last=1, include_saves=True), tz=UTC)
    assert [(e.name, e.rules) for e in plan_] == [("saved", ("last #1",)), ("kept", ()), ("old", ())]


# --- properties ------------------------------------------------------------------------------------------
PERIOD_OF = {
    "hourly": lambda t: (t.year, t.month, t.day, t.hour),
    "daily": lambda t: t.date(),
    "weekly": lambda t: t.isocalendar()[:2],
    "monthly": lambda t: (t.year, t.month),
    "yearly": lambda t: t.year,
}


def expected(cands: list[Candidate], policy: RetentionPolicy, tz: dt.tzinfo) -> dict[str, set[str]]:
    """The rules stated over sets: for each rule, group the checkpoints by period, take the N most
    recent periods, keep the newest checkpoint of each."""
    why: dict[str, set[str]] = {c.id: ({c.protected} if c.protected else set()) for c in cands}
    newest_first = sorted(cands, key=lambda c: (c.time, c.id), reverse=True)
    for rule, n in policy.counts().items():
        if n == 0:
            continue
        if rule == "last":
            groups = [[c] for c in newest_first]
        else:
            by_period: dict[object, list[Candidate]] = {}
            for c in cands:
                by_period.setdefault(PERIOD_OF[rule](c.time.astimezone(tz)), []).append(c)
            groups = sorted(by_period.values(), key=lambda g: max((c.time, c.id) for c in g), reverse=True)
        for rank, group in enumerate(groups[:n], start=1):
            why[max(group, key=lambda c: (c.time, c.id)).id].add(f"{rule} #{rank}")
    return why


EPOCH = dt.datetime(2024, 1, 1, tzinfo=UTC)


@st.composite
def calendars(draw):
    """Up to 60 checkpoints within ~2 years, clustered so that periods hold several (same-second ties too)."""
    n = draw(st.integers(min_value=1, max_value=60))
    span = draw(st.sampled_from([3 * 3600, 5 * 86400, 60 * 86400, 700 * 86400]))
    offsets = draw(st.lists(st.integers(min_value=0, max_value=span), min_size=n, max_size=n))
    marks = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    return [Candidate(f"c{i:02d}", EPOCH + dt.timedelta(seconds=o), "keep-mark" if m and i % 4 == 0 else None)
            for i, (o, m) in enumerate(zip(offsets, marks, strict=True))]


policies = st.builds(RetentionPolicy, **{f"keep_{r}": st.integers(min_value=0, max_value=6)
                                          for r in RetentionPolicy.RULES}).filter(lambda p: not p.empty)
zones = st.sampled_from([UTC, dt.timezone(dt.timedelta(hours=-5)), dt.timezone(dt.timedelta(hours=5, minutes=30))])


@settings(max_examples=250, deadline=None)
@given(calendars(), policies, zones)
def test_kept_set_is_what_the_rules_say(cands, policy, tz):
    result = select(cands, policy, tz=tz)
    want = expected(cands, policy, tz)
    assert set(result) == {c.id for c in cands}
    assert {k: set(v) for k, v in result.items()} == want


@settings(max_examples=150, deadline=None)
@given(calendars(), policies, zones)
def test_never_the_newest_never_a_marked_one_and_each_rule_within_its_count(cands, policy, tz):
    result = select(cands, policy, tz=tz)
    newest = max(cands, key=lambda c: (c.time, c.id))
    assert result[newest.id], "the newest checkpoint was removed"
    assert all(result[c.id] for c in cands if c.protected), "a marked checkpoint was removed"
    for rule, n in policy.counts().items():
        assert sum(1 for v in result.values() for r in v if r.startswith(f"{rule} #")) <= n
    removed = {c.id for c in cands if not result[c.id]}
    # Removing what prune removed and pruning again removes nothing more: the kept set is stable.
    again = select([c for c in cands if c.id not in removed], policy, tz=tz)
    assert all(again.values())


# --- the [retention] config section ---------------------------------------------------------------------
def _config(tmp_path, text: str) -> Config:
    path = tmp_path / "xen-vtpm.conf"
    path.write_text(text)
    return Config.load(path)


def test_retention_section_and_per_guest_override(tmp_path):
    cfg = _config(tmp_path, "[xen-vtpm]\nstate_dir = /x\n[retention]\nkeep_daily = 7\nkeep_weekly = 4\n"
                            "[retention.guest1]\nkeep_daily = 14\ninclude_saves = yes\n")
    assert RetentionPolicy(**cfg.retention("guest2")) == RetentionPolicy(keep_daily=7, keep_weekly=4)
    assert RetentionPolicy(**cfg.retention("guest1")) == RetentionPolicy(keep_daily=14, keep_weekly=4,
                                                                        include_saves=True)
    assert set(cfg.retention()) == {f"keep_{r}" for r in RetentionPolicy.RULES} | {"include_saves"}


@pytest.mark.parametrize("text,message", [
    ("[retention]\nkeep_dayly = 3\n", "unknown key 'keep_dayly' in [retention]"),
    ("[retention.guest1]\nkeep_daily = -1\n", "key 'keep_daily' in [retention.guest1] has invalid value '-1'"),
    ("[retention]\ninclude_saves = maybe\n", "key 'include_saves' in [retention] has invalid value 'maybe'"),
])
def test_a_bad_retention_key_stops_every_command(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
        _config(tmp_path, text)
    assert "\n" not in str(err.value)
