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

from xen_vtpm.errors import IntegrityError
from xen_vtpm.model import CatalogEntry, Checkpoint
from xen_vtpm.xen.topology import XENBUS_STATES

Renderer = Callable[[Any], str]


def emit(args: argparse.Namespace, data: Any, render: Renderer | None = None) -> None:
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
    shown = [dict(r, result=_cut(r.get("result")), detail=_cut(r.get("detail"))) for r in rows]
    return render_table(shown, cols)


def _cut(text: Any, limit: int = 60) -> Any:
    return text if not isinstance(text, str) or len(text) <= limit else text[:limit - 1] + "…"


# --- checkpoints ----------------------------------------------------------------------------------
CHECKPOINT_COLUMNS = ["id", "name", "domain", "kind", "backend", "time", "size", "stored_bytes", "verified"]


def checkpoint_rows(described: list[tuple[CatalogEntry, Checkpoint | IntegrityError]]) -> list[dict[str, Any]]:
    """`verified` says whether the manifest MAC held (`verify` reads every chunk)."""
    rows = []
    for entry, ckpt in described:
        if isinstance(ckpt, Checkpoint):
            rows.append({"id": ckpt.id, "name": ckpt.name, "domain": ckpt.vm_name, "kind": ckpt.kind,
                         "backend": ckpt.meta.backend_kind, "time": ckpt.time, "size": ckpt.size,
                         "stored_bytes": ckpt.stored_bytes,
                         "verified": "manifest ok"})
        else:
            rows.append({**dataclasses.asdict(entry), "domain": entry.vm_name, "kind": None,
                         "verified": f"FAILED: {ckpt}"})
    return [{c: r.get(c) for c in CHECKPOINT_COLUMNS} for r in rows]


def checkpoints(rows: list[dict[str, Any]]) -> str:
    return render_table(rows, CHECKPOINT_COLUMNS)


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
