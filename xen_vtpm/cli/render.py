"""Turning command results into text: tables for people, JSON for scripts (``--json``).

Every command returns plain data; the functions here are the only place that decides how
it looks on a terminal.  Much of it came from outside the tool (checkpoint names and catalog
rows, domain names, XenStore values, arguments echoed in errors), so every string is printed
through ``clean``: a control character, an escape sequence or a newline in a name must not
forge or hide a row that an approver reads before a rollback.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

from xen_vtpm.xen.topology import XENBUS_STATES

Renderer = Callable[[Any], str]


def emit(args: argparse.Namespace, data: Any, render: Renderer | None = None) -> None:
    data = plain(data)
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True, default=str))
    elif not args.quiet:
        text = render(data) if render else render_default(data)
        if text:
            print(text)


def clean(text: str) -> str:
    """``text`` as one printable line: every character a terminal would act on (control and format
    characters, escapes, newlines, a byte that was not UTF-8) becomes a visible backslash escape."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:          # an undecodable byte kept by surrogateescape
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch.isprintable():
            out.append(ch)
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        else:
            out.append(f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


def plain(data: Any) -> Any:
    """The API's dataclasses as dicts (lists of them as lists of dicts): JSON and the tables print those."""
    if isinstance(data, list):
        return [plain(item) for item in data]
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        return dataclasses.asdict(data)
    return data


def render_default(data: Any) -> str:
    if isinstance(data, list):
        return render_table(data)
    if isinstance(data, dict):
        width = max((len(clean(str(k))) for k in data), default=0)
        return "\n".join(f"{clean(str(k)):<{width}}  {clean(str(v))}" for k, v in data.items())
    return "" if data is None else clean(str(data))


def render_table(rows: list[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(none)"
    columns = list(columns or rows[0].keys())
    cells = [[("-" if r.get(c) is None else clean(str(r.get(c)))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


# --- domains -----------------------------------------------------------------------------------
def _xenbus_state(code: str | None) -> str | None:
    if code is None or code not in XENBUS_STATES:
        return code                         # missing, or topology.INVALID: a domain wrote garbage
    return f"{code} {XENBUS_STATES[code]}"


def domains(rows: list[dict[str, Any]]) -> str:
    """One line per domain, or per vTPM frontend of a domain."""
    lines = []
    for dom in rows:
        head = {"domid": dom["domid"], "name": dom["name"], "role": dom["role"], "state": dom["state"]}
        if not dom["vtpms"]:
            lines.append(dict(head, vtpm=None, backend=None, fe_state=None, be_state=None, uuid=None, check=None))
        for v in dom["vtpms"]:
            backend = f"{v['backend_name']} ({v['backend_domid']})" if v["backend_domid"] is not None else None
            lines.append(dict(head, vtpm=v["devid"], backend=backend, fe_state=_xenbus_state(v["state"]),
                              be_state=_xenbus_state(v["backend_state"]), uuid=v["uuid"], check=v["uuid_check"]))
    return render_table(lines, ["domid", "name", "role", "state", "vtpm", "backend", "fe_state", "be_state",
                                "uuid", "check"])


# --- audit ----------------------------------------------------------------------------------------
def audit(rows: list[dict[str, Any]]) -> str:
    """A long result (a refusal names the failed check) is cut here; `--json` has it whole."""
    if not rows:
        return "(no audit records)"
    cols = ("seq", "time", "user", "action", "vm", "checkpoint", "counter", "result", "detail")
    # A prune's record names every checkpoint it removed.
    shown = [dict(r, result=_cut(r.get("result")), detail=_cut(r.get("detail")), checkpoint=_cut(r.get("checkpoint")))
             for r in rows]
    return render_table(shown, cols)


def _cut(text: Any, limit: int = 60) -> Any:
    return text if not isinstance(text, str) or len(text) <= limit else text[:limit - 1] + "…"


# --- checkpoints ----------------------------------------------------------------------------------
CHECKPOINT_COLUMNS = ["id", "name", "domain", "kind", "backend", "time", "size", "stored_bytes", "verified",
                      "kept"]


def checkpoints(rows: list[dict[str, Any]]) -> str:
    return render_table([dict(r, kept="keep" if r["kept"] else None) for r in rows], CHECKPOINT_COLUMNS)


# --- prune ------------------------------------------------------------------------------------------
def prune(results: list[dict[str, Any]]) -> str:
    """Per VM: a summary line, then every checkpoint newest first with what happens to it and why."""
    if not results:
        return "(no checkpoints)"
    out = []
    for res in results:
        verb = "would remove" if res["dry_run"] else "removed"
        freed = "" if res["dry_run"] else f", freed {res['freed_bytes']} bytes"
        rows = [dict(e, action="keep", rules=", ".join(e["rules"])) for e in res["kept"]]
        rows += [dict(e, action=verb.replace("removed", "remove"), rules=None) for e in res["removed"]]
        rows.sort(key=lambda r: (r["time"], r["id"]), reverse=True)
        out.append(f"{res['domain']}: kept {len(res['kept'])}, {verb} {len(res['removed'])}{freed}\n"
                   + render_table(rows, ["action", "id", "name", "kind", "time", "rules"]))
    return "\n\n".join(out)


# --- schedules -------------------------------------------------------------------------------------
def schedules(rows: list[dict[str, Any]]) -> str:
    """The last run's result is cut here, like the audit log's; `--json` has it whole."""
    if not rows:
        return "(no schedules)"
    return render_table([dict(r, last_run=_cut(r["last_run"])) for r in rows],
                        ["guest", "unit", "on_calendar", "enabled", "last_run"])


# --- doctor ------------------------------------------------------------------------------------
def checks(rows: list[dict[str, Any]]) -> str:
    """`xen-vtpm doctor`: PASS/FAIL per check, the fix under each failure, a last line with the count."""
    lines = []
    for row in rows:
        lines.append(f"{'PASS' if row['passed'] else 'FAIL'}  {row['name']}: {row['detail']}")
        if not row["passed"] and row["fix"]:
            lines.append(f"      fix: {row['fix']}")
    failed = sum(not r["passed"] for r in rows)
    lines.append(f"{len(rows) - failed} of {len(rows)} checks pass" + (f", {failed} fail" if failed else ""))
    return "\n".join(lines)
