"""The examples of the README and the user guide run as written.

The simulated-host blocks run in a fresh shell from the source directory, as a new user would paste them:
no venv on PATH, no XEN_VTPM_* variables, only the block's own `eval "$(... sim up ...)"` (in a directory
of the test's own instead of /tmp/xh).  Every `xen-vtpm` command line of the README, the user guide, the API
page and the man page's examples must parse; the config examples must load; and the prune transcript of the
user guide must be what the rules give for its calendar.
"""
from __future__ import annotations

import configparser
import datetime as dt
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from sim_fixture import SimHost, stop_sim_host

from xen_vtpm.cli.app import build_parser
from xen_vtpm.config import Config
from xen_vtpm.core.retention import Candidate, select
from xen_vtpm.model import RetentionPolicy
from xen_vtpm_sim import host as sim_host

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GUIDE = ROOT / "docs" / "user-guide.md"
SIM_DIR = "/tmp/xh"


def blocks(path: Path, lang: str = "") -> list[tuple[str, str]]:
    """(heading, body) of every fenced block of `lang` (any with "")."""
    out, heading = [], ""
    for m in re.finditer(r"^(#{2,4} [^\n]*)$|^```(\w*)\n(.*?)^```", path.read_text(), re.M | re.S):
        if m.group(1):
            heading = m.group(1)
        elif not lang or m.group(2) == lang:
            out.append((heading, m.group(3)))
    return out


def block_under(path: Path, heading: str, lang: str, containing: str = "") -> str:
    found = [body for head, body in blocks(path, lang) if head == heading and containing in body]
    assert len(found) == 1, f"{path.name}: expected one {lang} block under {heading!r}, found {len(found)}"
    return found[0]


def fresh_shell_env() -> dict[str, str]:
    """A new login's environment: no venv (nor any directory with a xen-vtpm) on PATH, no XEN_VTPM_*."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("XEN_VTPM", "XENSTORED")) and k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep)
                                  if d and not (Path(d) / "xen-vtpm").exists())
    return env


def run_sim_block(text: str, where: Path) -> subprocess.CompletedProcess:
    assert text.count(SIM_DIR) >= 2, f"the block no longer uses {SIM_DIR}: update this test"
    sim_dir = where / "xh"
    script = text.replace(SIM_DIR, str(sim_dir))
    try:
        return subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=ROOT, env=fresh_shell_env(),
                              capture_output=True, text=True, timeout=600)
    finally:
        if (sim_dir / "run").is_dir():   # the block ends with `sim down`; this is for a failed run
            stop_sim_host(SimHost(dir=sim_dir, env=dict(os.environ)))


def test_readme_simulated_host_example_runs_as_written(tmp_path):
    body = block_under(README, "## The simulated Xen host", "sh")
    assert (ROOT / ".venv" / "bin" / "xen-vtpm").exists(), "the README's example starts from .venv (make setup)"
    proc = run_sim_block(body, tmp_path)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert re.search(r"^[0-9a-f-]{36}$", proc.stdout, re.M), "snapshot printed no checkpoint id"
    assert re.search(r"^\d+\s+guest1\s+guest\s.*4 Connected\s+4 Connected", proc.stdout, re.M), proc.stdout
    assert not sim_host.is_up(tmp_path / "xh")


def test_user_guide_simulated_host_walkthrough_runs_as_written(tmp_path):
    body = block_under(GUIDE, "### Try it first on the simulated host", "sh", containing="sim up")
    proc = run_sim_block(body, tmp_path)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    out = proc.stdout
    assert "guest1: kept 2, would remove 1" in out and "guest1: kept 2, removed 1, freed " in out
    rows = [ln.split() for ln in out.splitlines() if re.match(r"[0-9a-f-]{36}\s+s\d\s.*manifest ok", ln)]
    assert [(r[1], r[-1]) for r in rows] == [("s1", "keep"), ("s3", "-")], out
    assert re.search(r"^rolled_back_to\s+[0-9a-f-]{36}$", out, re.M)
    assert re.search(r"^deleted\s+[0-9a-f-]{36}$", out, re.M)
    assert re.search(r"^status\s+ok$", out, re.M)   # audit --verify


# --- every command line parses --------------------------------------------------------------------------
COMMAND = re.compile(r"(?<![\w/.-])xen-vtpm((?:[ \t]+[^\s;&|)#`]+)*)")


def command_lines() -> list[tuple[str, list[str]]]:
    found = []
    for path in (README, GUIDE, ROOT / "docs" / "api.md", ROOT / "xl-hooks" / "README.md"):
        for _, body in blocks(path):
            for line in body.splitlines():
                line = re.sub(r"\s#\s.*$", "", re.sub(r"^# ", "", line.strip()))   # prompt, comment
                if " | " in line:        # the README's list of alternatives, not one command
                    continue
                found += [(f"{path.name}: {line}", shlex.split(m.group(1))) for m in COMMAND.finditer(line)]
    man = (ROOT / "docs" / "xen-vtpm.1").read_text()
    examples = man[man.index(".SH EXAMPLES"):man.index(".SH SEE ALSO")]
    text = examples.replace("\\-", "-").replace("\\e\n", " ")
    for line in text.splitlines():
        if line.startswith("xen-vtpm") or "$(xen-vtpm" in line:
            found += [(f"xen-vtpm.1: {line}", shlex.split(m.group(1))) for m in COMMAND.finditer(line)]
    return found


def test_every_documented_command_line_parses():
    lines = command_lines()
    assert len(lines) > 40, "the command extraction found almost nothing: fix the pattern"
    for used in ("prune", "keep", "unkeep", "schedule"):
        assert any(argv[:1] == [used] or used in argv[:2] for _, argv in lines), f"no example of {used}"
    parser = build_parser()
    for where, argv in lines:
        argv = [a.strip("[]") for a in argv if a.strip("[]")]   # synopsis lines mark options [optional]
        if not argv or argv[0] == "--version" or "COMMAND" in argv:   # the general synopsis
            continue
        try:
            parser.parse_args(argv)
        except Exception as exc:   # noqa: BLE001 - report which example broke
            pytest.fail(f"{where}: {exc}")


# --- config examples ---------------------------------------------------------------------------------------
def test_user_guide_config_examples_load(tmp_path):
    inis = [body for _, body in blocks(GUIDE, "ini")]
    assert len(inis) == 2
    for i, body in enumerate(inis):
        path = tmp_path / f"{i}.conf"
        path.write_text(body)
        cfg = Config.load(path)
        parser = configparser.ConfigParser(interpolation=None)
        parser.read_string(body)
        if parser.has_section("xen-vtpm"):   # the complete file: every key of the config, documented
            assert set(parser["xen-vtpm"]) == set(cfg.to_mapping())
        else:
            assert RetentionPolicy(**cfg.retention("db1")) == RetentionPolicy(
                keep_last=3, keep_daily=30, keep_weekly=4, keep_monthly=6, include_saves=True)
            assert cfg.schedule("db1") == {"on_calendar": "hourly", "prune": True}
            assert cfg.schedule("guest1")["on_calendar"] == "*-*-* 02:30:00"


def test_user_guide_prune_transcript_is_what_the_rules_give():
    (body,) = [b for head, b in blocks(GUIDE) if head.startswith("### `prune") and "# xen-vtpm prune" in b]
    lines = body.splitlines()
    argv = shlex.split(lines[0].removeprefix("# xen-vtpm "))
    counts = {a[7:].replace("-", "_"): int(b) for a, b in zip(argv, argv[1:], strict=False) if a.startswith("--keep-")}
    rows = []
    for ln in lines[3:]:
        m = re.match(r"(keep|would remove)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(.*)$", ln)
        assert m, ln
        rows.append(m.groups())
    cands = [Candidate(r[1], dt.datetime.fromisoformat(r[4]), "keep-mark" if "keep-mark" in r[5] else None)
             for r in rows if r[3] != "save"]
    got = select(cands, RetentionPolicy(**{f"keep_{k}": v for k, v in counts.items()}), tz=dt.UTC)
    for action, ckpt_id, _, kind, _, rules in rows:
        if kind == "save":
            assert rules == "save-binding"
            continue
        assert (", ".join(got[ckpt_id]) or "-") == rules, (ckpt_id, got[ckpt_id], rules)
        assert (action == "keep") == bool(got[ckpt_id])
