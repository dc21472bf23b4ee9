"""Routing of the xl wrapper: which commands xen-vtpm takes over, refuses, or passes through."""
import os
import stat
from pathlib import Path

import pytest

from xen_vtpm.errors import PreconditionFailed, UsageError, XlError
from xen_vtpm.xen import wrapper as hooks

VTPM_DOMS = {"guest1"}
VTPM_FILES = {"/s/guest1.save"}


def route(*argv):
    return hooks.route(list(argv), has_vtpm_domain=VTPM_DOMS.__contains__, has_vtpm_file=VTPM_FILES.__contains__)


def test_other_commands_pass_through_untouched():
    for argv in (["list"], ["create", "g.cfg", "-p"], ["vtpm-list", "guest1"], ["destroy", "guest1"], []):
        assert route(*argv).action == "passthrough"


def test_save_of_guest_without_vtpm_passes_through():
    assert route("save", "-c", "plain", "/s/plain.save").action == "passthrough"


def test_save_of_vtpm_guest_is_taken_over():
    r = route("save", "guest1", "/s/guest1.save")
    assert (r.action, r.domain, r.file) == ("save", "guest1", "/s/guest1.save")


@pytest.mark.parametrize("flag", ["-c", "-p", "-cp"])
def test_checkpointing_save_of_vtpm_guest_is_refused_with_reason(flag):
    with pytest.raises(PreconditionFailed, match="two guests to one vTPM"):
        route("save", flag, "guest1", "/s/x")


def test_save_with_config_override_is_refused():
    with pytest.raises(UsageError, match="config override"):
        route("save", "guest1", "/s/x", "other.cfg")


def test_restore_of_vtpm_file_is_taken_over_with_pause_flag():
    r = route("restore", "-p", "/s/guest1.save")
    assert (r.action, r.file, r.paused) == ("restore", "/s/guest1.save", True)
    assert route("restore", "/s/guest1.save").paused is False
    assert route("restore", "/s/other.save").action == "passthrough"


def test_restore_with_cfg_override_is_refused():
    with pytest.raises(UsageError, match="re-point the guest's vTPM"):
        route("restore", "new.cfg", "/s/guest1.save")


def test_migrate_of_vtpm_guest_is_taken_over_other_guests_pass():
    r = route("migrate", "guest1", "host2")
    assert (r.action, r.domain, r.host, r.ssh, r.paused) == ("migrate", "guest1", "host2", "ssh", False)
    r = route("migrate", "-s", "ssh -p 2222", "-p", "guest1", "host2")
    assert (r.action, r.host, r.ssh, r.paused) == ("migrate", "host2", "ssh -p 2222", True)
    assert route("migrate", "-sxen-vtpm sim ssh", "-e", "guest1", "/tmp/h").ssh == "xen-vtpm sim ssh"
    assert route("migrate", "plain", "host2").action == "passthrough"
    assert route("migrate", "-C", "x.cfg", "plain", "host2").action == "passthrough"


@pytest.mark.parametrize("argv", [["-C", "other.cfg"], ["--debug"], ["-D"], ["--live"]])
def test_migrate_options_that_change_what_moves_are_refused(argv):
    with pytest.raises(UsageError, match="not supported by the xen-vtpm wrapper"):
        route("migrate", *argv, "guest1", "host2")


def _script(path, text="#!/bin/sh\nexit 0\n"):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_real_xl_skips_the_wrapper_itself(tmp_path, monkeypatch):
    wrap, real = tmp_path / "wrap", tmp_path / "real"
    wrap.mkdir(), real.mkdir()
    me = _script(wrap / "xl")
    real_xl = _script(real / "xl")
    monkeypatch.setenv("PATH", f"{wrap}{os.pathsep}{real}")
    monkeypatch.setenv("XEN_VTPM_HOOK_SELF", str(me))
    assert hooks.real_xl("xl") == str(real_xl)


def test_real_xl_missing_is_a_clear_error(tmp_path, monkeypatch):
    wrap = tmp_path / "wrap"
    wrap.mkdir()
    me = _script(wrap / "xl")
    monkeypatch.setenv("PATH", str(wrap))
    monkeypatch.setenv("XEN_VTPM_HOOK_SELF", str(me))
    with pytest.raises(XlError, match="real xl was not found"):
        hooks.real_xl("xl")


def test_real_xl_skips_a_wrapper_copy_even_when_not_called_through_it(tmp_path, monkeypatch):
    """`xen-vtpm snapshot` run directly with the wrapper first in PATH must still reach the real xl."""
    wrap, real = tmp_path / "wrap", tmp_path / "real"
    wrap.mkdir(), real.mkdir()
    (wrap / "xl").write_text((Path(hooks.__file__).parents[2] / "xl-hooks" / "xl").read_text())
    (wrap / "xl").chmod(0o755)
    real_xl = _script(real / "xl")
    monkeypatch.setenv("PATH", f"{wrap}{os.pathsep}{real}")
    monkeypatch.delenv("XEN_VTPM_HOOK_SELF", raising=False)
    assert hooks.real_xl("xl") == str(real_xl)


@pytest.mark.parametrize("argv", [["save", "-D", "guest1", "/s/x"], ["restore", "-e", "/s/guest1.save"]])
def test_options_the_wrapper_cannot_honour_are_refused_not_dropped(argv):
    with pytest.raises(UsageError, match="not supported by the xen-vtpm wrapper"):
        route(*argv)
