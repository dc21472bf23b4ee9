"""xen_vtpm.xen.xl.Xl: output parsers on real xl output, and the error paths of running xl.

The error paths run a real subprocess: a small stand-in `xl` script that behaves
like xl does when it fails (message on stderr, non-zero exit, or no answer).
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from xen_vtpm.config import Config
from xen_vtpm.errors import XlError
from xen_vtpm.xen.xl import Xl, parse_vtpm_list, parse_xl_list

# `xl list` on a dom0 with the vtpm-platforms.txt example running (xl_info.c list_domains format).
XL_LIST = """\
Name                                        ID   Mem VCPUs\tState\tTime(s)
Domain-0                                     0  3934     2     r-----     164.3
vtpmmgr                                      1     8     1     -b----       0.9
vtpm-guest1                                  2     8     1     -b----       0.4
guest1                                       3  1024     2     --p---       12.0
guest two                                    4   512     1     -b---d       3.5
"""

# `xl vtpm-list guest1` (xl_vtpm.c main_vtpmlist format).
XL_VTPM_LIST = """\
Idx BE Uuid                                 handle state evt-ch ring-ref BE-path
0   2  ac0a5b9e-cbe2-4c07-b43b-1d69e46fb839      0     4      9      768 /local/domain/2/backend/vtpm/3/0
1   5  C0FFEE00-cbe2-4c07-b43b-1d69e46fb839      1     1     -1       -1 /local/domain/5/backend/vtpm/3/1
"""


def test_parse_xl_list():
    rows = parse_xl_list(XL_LIST)
    assert [r["name"] for r in rows] == ["Domain-0", "vtpmmgr", "vtpm-guest1", "guest1", "guest two"]
    assert rows[3] == {"name": "guest1", "domid": 3, "mem": 1024, "vcpus": 2, "state": "--p---", "time": 12.0}
    assert rows[4]["state"] == "-b---d"


def test_parse_xl_list_rejects_garbage():
    with pytest.raises(XlError, match="no header line"):
        parse_xl_list("")
    with pytest.raises(XlError, match="unexpected output line 'guest1 three 1024'"):
        parse_xl_list(XL_LIST.splitlines()[0] + "\nguest1 three 1024\n")


def test_parse_vtpm_list():
    rows = parse_vtpm_list(XL_VTPM_LIST)
    assert rows[0] == {"devid": 0, "backend_domid": 2, "uuid": "ac0a5b9e-cbe2-4c07-b43b-1d69e46fb839",
                       "state": 4, "evtch": 9, "ring_ref": 768,
                       "backend_path": "/local/domain/2/backend/vtpm/3/0"}
    assert rows[1]["uuid"] == "c0ffee00-cbe2-4c07-b43b-1d69e46fb839" and rows[1]["state"] == 1
    assert parse_vtpm_list(XL_VTPM_LIST.splitlines()[0] + "\n") == []
    with pytest.raises(XlError, match="unexpected output line"):
        parse_vtpm_list("0 2 not-a-uuid 0 4 9 768 /x\n")


def fake_xl(tmp_path: Path, body: str) -> Xl:
    """An executable stand-in for xl that records its argv, then runs `body`."""
    script = tmp_path / "xl"
    script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> "{tmp_path}/argv"\n{body}\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return Xl(Config(xl=str(script)), timeout=20)


def argv_log(tmp_path: Path) -> list[str]:
    return (tmp_path / "argv").read_text().splitlines()


def test_failure_raises_xl_error_with_command_and_reason(tmp_path):
    xl = fake_xl(tmp_path, 'echo "Parsing config from guest1.cfg" >&2\n'
                           'echo "libxl: error: libxl_domain.c:123: domain 9 does not exist" >&2\nexit 1')
    with pytest.raises(XlError) as exc:
        xl.pause("guest1")
    msg = str(exc.value)
    assert msg == "xl pause guest1: libxl: error: libxl_domain.c:123: domain 9 does not exist (exit 1)"
    assert exc.value.exit_code == 9


def test_failure_without_error_word_uses_last_stderr_line(tmp_path):
    xl = fake_xl(tmp_path, 'echo "Saving to x new xl format" >&2\necho "guest went away" >&2\nexit 3')
    with pytest.raises(XlError, match=r"^xl save guest1 x: guest went away \(exit 3\)$"):
        xl.save("guest1", "x")
    xl = fake_xl(tmp_path, "exit 1")
    with pytest.raises(XlError, match=r"^xl destroy 4: no message on stderr \(exit 1\)$"):
        xl.destroy(4)


def test_every_call_has_a_timeout(tmp_path):
    xl = fake_xl(tmp_path, "exec sleep 30")
    xl.timeout = 0.5
    with pytest.raises(XlError, match=r"^xl list: no answer within 0.5 s \(killed\)"):
        xl.list()


def test_missing_or_unexecutable_xl(tmp_path):
    with pytest.raises(XlError, match="not found; install Xen's xl"):
        Xl(Config(xl=str(tmp_path / "no-such-xl"))).list()
    plain = tmp_path / "plain"
    plain.write_text("not a program")
    with pytest.raises(XlError, match="is not executable"):
        Xl(Config(xl=str(plain))).list()


def test_commands_and_options(tmp_path):
    xl = fake_xl(tmp_path, 'case "$1" in\n'
                           f'  list) cat <<EOF\n{XL_LIST}EOF\n;;\n'
                           '  domid) echo 3;;\n'
                           '  domname) echo guest1;;\n'
                           f'  vtpm-list) cat <<EOF\n{XL_VTPM_LIST}EOF\n;;\n'
                           'esac')
    assert xl.list()[3]["name"] == "guest1"
    assert xl.domid("guest1") == 3
    assert xl.domname(3) == "guest1"
    assert xl.vtpm_list("guest1")[0]["backend_domid"] == 2
    xl.pause("guest1")
    xl.unpause(3)
    xl.destroy("guest1")
    xl.save("guest1", tmp_path / "g.sav")
    xl.save("guest1", "g.sav", cfg="g.cfg", checkpoint=True)
    xl.save(3, "g.sav", leave_paused=True)
    xl.restore("g.sav")
    xl.restore("g.sav", cfg="g.cfg", paused=True)
    xl.create("g.cfg")
    xl.create("g.cfg", paused=True)
    assert argv_log(tmp_path) == [
        "list", "domid guest1", "domname 3", "vtpm-list guest1", "pause guest1", "unpause 3", "destroy guest1",
        f"save guest1 {tmp_path / 'g.sav'}", "save -c guest1 g.sav g.cfg", "save -p 3 g.sav",
        "restore g.sav", "restore -p g.cfg g.sav", "create g.cfg", "create -p g.cfg"]


def test_unexpected_outputs(tmp_path):
    xl = fake_xl(tmp_path, 'echo "Can\'t get domid of domain name \'x\', maybe this domain does not exist."')
    with pytest.raises(XlError, match="xl domid x: unexpected output"):
        xl.domid("x")
    xl = fake_xl(tmp_path, "true")
    with pytest.raises(XlError, match="xl domname 9: empty output"):
        xl.domname(9)


def test_vtpm_list_of_unknown_domain_is_an_error(tmp_path):
    """xl vtpm-list prints the error but exits 0: the runner must not return []."""
    xl = fake_xl(tmp_path, 'echo "Idx BE Uuid handle state evt-ch ring-ref BE-path"\n'
                           'echo "nosuch is an invalid domain identifier" >&2\nexit 0')
    with pytest.raises(XlError, match="xl vtpm-list nosuch: nosuch is an invalid domain identifier"):
        xl.vtpm_list("nosuch")


def test_xl_found_through_path(tmp_path, monkeypatch):
    fake_xl(tmp_path, "echo 0")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert Xl(Config(xl="xl")).domid("Domain-0") == 0
