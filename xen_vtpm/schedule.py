"""Scheduled checkpoints: systemd timers that snapshot and prune a guest (`xen-vtpm schedule ...`).

Two unit templates ship in ``xen_vtpm/units/``: ``xen-vtpm-snapshot@.service`` runs
`xen-vtpm schedule run GUEST` (snapshot, then prune with the guest's [retention] rules) and
``xen-vtpm-snapshot@.timer`` starts it.  ``install`` writes both into the unit directory with this
xen-vtpm's command line, a drop-in per guest with its ``OnCalendar=`` ([schedule] on_calendar,
[schedule.GUEST] over it) and enables the guest's timer with `systemctl`; ``root`` works on another
root directory, as `systemctl --root` does (an image being built, a test).
"""
from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from xen_vtpm.config import Config
from xen_vtpm.durable import make_dirs, write_atomic
from xen_vtpm.errors import NotFound, PreconditionFailed, UsageError, XenVtpmError
from xen_vtpm.host import session
from xen_vtpm.model import RetentionPolicy

UNIT = "xen-vtpm-snapshot"
TEMPLATES = (f"{UNIT}@.service", f"{UNIT}@.timer")
UNIT_DIR = Path("/etc/systemd/system")
DROP_IN = "schedule.conf"
SCHEDULED = "schedule"          # the audit action of a run (api.Host.run_schedule)
# Characters systemd keeps as they are in an instance name, so %i is the guest's name.
_INSTANCE_RE = re.compile(r"[A-Za-z0-9:_.-]{1,200}")


@dataclasses.dataclass(frozen=True)
class Schedule:
    guest: str
    on_calendar: str
    enabled: bool           # the timer is enabled (wanted by timers.target)
    last_run: str | None    # the last scheduled run the audit log records: its time and result
    unit: str


def timer(guest: str) -> str:
    if not _INSTANCE_RE.fullmatch(guest):
        raise UsageError(f"schedule {guest!r}: a scheduled guest's name may hold only letters, digits, ':', '_', "
                         "'.' and '-' (it becomes part of a systemd unit name)")
    return f"{UNIT}@{guest}.timer"


def _unit_dir(root: Path | None) -> Path:
    return UNIT_DIR if root is None else Path(root) / UNIT_DIR.relative_to("/")


def command(cfg: Config) -> str:
    """The unit's command line: the xen-vtpm of this installation, with this config file."""
    script = Path(sys.executable).parent / "xen-vtpm"
    argv = [str(script)] if os.access(script, os.X_OK) else [sys.executable, "-m", "xen_vtpm"]
    if cfg.path is not None:
        argv += ["--config", str(Path(cfg.path).resolve())]
    # systemd expands '%' specifiers in ExecStart=; every other character is quoted as in a shell.
    return " ".join(shlex.quote(a) for a in argv).replace("%", "%%")


def rules(cfg: Config, guest: str) -> RetentionPolicy | None:
    """The retention rules a run of ``guest``'s schedule prunes with (None: ``prune = no``).  A run that
    would prune without any rule is refused, here and before each run: it would fill the disk."""
    if not cfg.schedule(guest)["prune"]:
        return None
    policy = RetentionPolicy(**cfg.retention(guest))
    if policy.empty:
        raise UsageError(f"schedule {guest}: prune = yes but no keep_* rule in [retention] or [retention.{guest}] "
                         f"of {cfg.path}; set one, or prune = no, so the runs do not fill the disk")
    return policy


def _check_calendar(expr: str, where: str) -> None:
    """Refuse an OnCalendar= systemd cannot parse now, not at the first run that never comes."""
    if "\n" in expr or not expr.strip():
        raise UsageError(f"{where}: on_calendar {expr!r} is empty or spans lines; give a systemd calendar "
                         "expression such as `daily` or `*-*-* 02:30:00` (systemd.time(7))")
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    proc = subprocess.run([analyze, "calendar", expr], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise UsageError(f"{where}: on_calendar {expr!r} is not a systemd calendar expression "
                         "(see `systemd-analyze calendar` and systemd.time(7)); fix it in the config file")


def _systemctl(root: Path | None, *args: str) -> None:
    exe = shutil.which("systemctl")
    if exe is None:
        raise PreconditionFailed("schedule: systemctl not found; the timers need systemd (install it, or run "
                                 "`xen-vtpm schedule run GUEST` from another scheduler)")
    argv = [exe, *([f"--root={root}"] if root is not None else []), *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise PreconditionFailed(f"schedule: `{' '.join(argv[1:])}` failed (exit {proc.returncode}): {last}")


def _running(root: Path | None) -> bool:
    """Whether systemd manages this root now (sd_booted(3)): only then are units started and stopped."""
    return root is None and Path("/run/systemd/system").is_dir()


def install(cfg: Config, guest: str, root: Path | None = None) -> dict[str, Any]:
    unit = timer(guest)
    sched = cfg.schedule(guest)
    _check_calendar(sched["on_calendar"], f"{cfg.path}: [schedule.{guest}] or [schedule]")
    rules(cfg, guest)
    units = _unit_dir(root)
    make_dirs(units, what="creating the systemd unit directory")
    cmd = command(cfg)
    for name in TEMPLATES:
        text = resources.files("xen_vtpm").joinpath("units", name).read_text(encoding="utf-8")
        write_atomic(units / name, text.replace("@COMMAND@", cmd).encode(), mode=0o644)
    drop_in = units / f"{unit}.d"
    make_dirs(drop_in, what="creating the timer's drop-in directory")
    # An empty OnCalendar= first clears the template's own schedule.
    write_atomic(drop_in / DROP_IN, f"[Timer]\nOnCalendar=\nOnCalendar={sched['on_calendar']}\n".encode(),
                 mode=0o644)
    if _running(root):
        _systemctl(root, "daemon-reload")
        _systemctl(root, "enable", "--now", unit)
    else:
        _systemctl(root, "enable", unit)
    return {"guest": guest, "unit": unit, "on_calendar": sched["on_calendar"], "prune": sched["prune"],
            "command": f"{cmd} schedule run {guest}", "started": _running(root)}


def remove(cfg: Config, guest: str, root: Path | None = None) -> dict[str, Any]:
    unit = timer(guest)
    units = _unit_dir(root)
    drop_in = units / f"{unit}.d"
    if not (drop_in / DROP_IN).exists() and not _enabled(units, unit):
        raise NotFound(f"schedule {guest}: no schedule installed in {units}; see `xen-vtpm schedule list`")
    _systemctl(root, "disable", *(["--now"] if _running(root) else []), unit)
    (drop_in / DROP_IN).unlink(missing_ok=True)
    if drop_in.is_dir() and not any(drop_in.iterdir()):
        drop_in.rmdir()
    left = [s for s in _installed(units) if s != guest]
    if not left:   # the last one: the templates go too
        for name in TEMPLATES:
            (units / name).unlink(missing_ok=True)
    if _running(root):
        _systemctl(root, "daemon-reload")
    return {"guest": guest, "unit": unit, "removed": True}


def _enabled(units: Path, unit: str) -> bool:
    # The link names the template by its path on the running system, so under --root it dangles.
    return os.path.lexists(units / "timers.target.wants" / unit)


def _installed(units: Path) -> list[str]:
    """Guests with a schedule: a drop-in or an enabled timer instance."""
    found = {p.name[len(UNIT) + 1:-len(".timer.d")] for p in units.glob(f"{UNIT}@?*.timer.d")}
    found |= {p.name[len(UNIT) + 1:-len(".timer")] for p in (units / "timers.target.wants").glob(f"{UNIT}@?*.timer")}
    return sorted(found)


def listing(cfg: Config, root: Path | None = None) -> list[Schedule]:
    units = _unit_dir(root)
    try:
        runs = [r for r in session.audit_records(cfg) if r.get("action") == SCHEDULED]
    except XenVtpmError:   # not provisioned (or no catalog yet): no run can have happened
        runs = []
    out = []
    for guest in _installed(units):
        unit = timer(guest)
        on_calendar = "daily (the template's)"
        drop_in = units / f"{unit}.d" / DROP_IN
        if drop_in.exists():
            values = [ln.split("=", 1)[1] for ln in drop_in.read_text().splitlines() if ln.startswith("OnCalendar=")]
            on_calendar = next((v for v in reversed(values) if v), on_calendar)
        last = next((r for r in reversed(runs) if r.get("vm") == guest), None)
        out.append(Schedule(guest=guest, on_calendar=on_calendar,
                            enabled=_enabled(units, unit),
                            last_run=f"{last['time']} {last['result']}" if last else None, unit=unit))
    return out
