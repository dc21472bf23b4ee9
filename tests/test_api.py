"""The Python API as docs/api.md documents it: its example script, run as printed on the simulated host,
every method of the reference with the result type it lists, and the documented error classes and exit
codes.  The doc and the code are compared both ways, so neither can drift alone."""
from __future__ import annotations

import ast
import dataclasses
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from crash_helpers import faulty_argv, read_pcr16, tcti
from e2e_helpers import GUEST, assert_one_line_error
from sim_fixture import initialised_host

import xen_vtpm
from xen_vtpm import api, errors

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
TEXT = DOC.read_text()


def section(title: str) -> str:
    """From the heading to the next heading of its level or above."""
    body = TEXT.index(f"\n{title}\n") + len(title) + 2
    level = len(title) - len(title.lstrip("#"))
    end = re.search(rf"^#{{1,{level}}} ", TEXT[body:], re.M)
    return TEXT[body:body + end.start()] if end else TEXT[body:]


def example_script() -> str:
    blocks = re.findall(r"```python\n(.*?)```", section("## A complete example"), re.S)
    assert len(blocks) == 1, "the example section must hold exactly one python block"
    return blocks[0]


def table_rows(part: str) -> list[list[str]]:
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in part.splitlines() if ln.startswith("| ")]
    return rows[1:]   # without the header


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    with initialised_host(tmp_path_factory.mktemp("api") / "h", GUEST) as sim:
        yield sim


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("script") / "upgrade-guest.py"
    path.write_text(example_script())
    return path


def run_script(sim, script: Path, *args: str) -> subprocess.CompletedProcess:
    """As docs/api.md says to run it: the Python that has xen-vtpm, the host's config in the environment."""
    return sim.run([sys.executable, str(script), *args], check=False, timeout=300)


def test_example_script_upgrade_that_works(sim, script):
    proc = run_script(sim, script, GUEST, "true")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert re.fullmatch(r"checkpoint before-upgrade-\d{8}-\d{6}: guest paused \d+\.\d{3} s, \d+ bytes stored", out[0])
    assert out[1] == f"pruned 0 checkpoints of {GUEST}, freed 0 bytes"
    listed = [ln for ln in out[2:] if " before-upgrade-" in ln]
    assert listed and listed[-1].split()[2:] == ["snapshot", "kept", "manifest", "ok"], out
    (ckpt,) = [c for c in api.Host(sim.config).checkpoints(GUEST) if c.name == out[0].split()[1][:-1]]
    assert ckpt.kept and ckpt.ok


def test_example_script_rolls_back_a_failed_upgrade(sim, script):
    before = read_pcr16(sim)
    # The "upgrade" changes the guest's vTPM, then fails.
    upgrade = f'tpm2_pcrextend -T "{tcti(sim)}" 16:sha256={secrets.token_hex(32)}; exit 1'
    proc = run_script(sim, script, GUEST, "sh", "-c", upgrade)
    assert proc.returncode == 1, proc.stderr
    m = re.fullmatch(r"upgrade failed: guest1 is back at (before-upgrade-\S+); its failed state is checkpoint (\S+)",
                     proc.stdout.splitlines()[-1])
    assert m, proc.stdout
    assert read_pcr16(sim) == before, "the vTPM is not back at the checkpoint"
    names = {c.id: c.name for c in api.Host(sim.config).checkpoints(GUEST)}
    assert names[m.group(2)].startswith("pre-rollback-")


def test_example_script_reports_an_error_like_the_command(sim, script):
    proc = run_script(sim, script, "no-such-guest", "true")
    assert proc.returncode == errors.DomainNotFound.exit_code == 3
    assert assert_one_line_error(sim.tool("snapshot", "no-such-guest", check=False)).endswith(
        proc.stderr.strip().removeprefix("no-such-guest: "))


def test_every_documented_method_returns_its_documented_type(sim, tmp_path):
    """The reference table against the code, then each method called on the simulated host."""
    rows = table_rows(section("## Reference").split("### Results")[0])
    documented = {}
    for cell, returns, _ in rows:
        for name in re.findall(r"`(\w+)\(", cell):
            documented[name] = returns.strip("`")
    public = {n for n, v in vars(api.Host).items() if callable(v) and not n.startswith("_")}
    assert set(documented) - {"Host"} == public, "docs/api.md and api.Host list different methods"

    host = api.Host(sim.config)
    called = {"status": host.status(), "doctor": host.doctor(), "snapshot": host.snapshot(GUEST, name="api-a")}
    # A keep killed after its first step, for recover to finish.
    killed = sim.run([*faulty_argv(crash_at=["keep:mark"]), "keep", "api-a"], check=False)
    assert killed.returncode == -9, killed.stderr
    called |= {
        "recover": host.recover(),
        "keep": host.keep("api-a"),
        "unkeep": host.unkeep("api-a"),
        "checkpoints": host.checkpoints(GUEST),
        "verify": host.verify("api-a"),
        "retention": host.retention(GUEST),
        "prune": host.prune(GUEST, xen_vtpm.RetentionPolicy(keep_last=50), dry_run=True),
    }
    assert called["recover"][0].kind == "keep" and called["recover"][0].outcome == "finished"
    saved = tmp_path / "g.save"
    called["save"] = host.save(GUEST, saved)
    called["restore"] = host.restore(saved)
    called["rollback"] = host.rollback(GUEST, "api-a", safety_checkpoint=False)
    called["delete"] = host.delete("api-a")
    conf = tmp_path / "sched.conf"
    conf.write_text(sim.config.read_text() + "[schedule]\nprune = no\n")
    called["run_schedule"] = api.Host(conf).run_schedule(GUEST)
    assert set(called) == public
    for name, value in called.items():
        want = documented[name]
        if want.startswith("list["):
            assert isinstance(value, list) and value, name
            value = value[0]
            want = want[5:-1]
        assert type(value).__name__ == want, f"{name} returned {type(value).__name__}, docs say {want}"
    assert called["rollback"].safety_checkpoint is None and called["run_schedule"].prune is None


def test_documented_result_fields_are_the_dataclass_fields():
    for cls_cell, fields_cell, *_ in table_rows(section("### Results")):
        cls = getattr(xen_vtpm, cls_cell.strip("`"))
        # the names in backticks that open each comma-separated item
        listed = [m.group(1) for item in re.split(r",(?![^(]*\))", fields_cell)
                  if (m := re.match(r"\s*`(\w+)`", item))]
        fields = [f.name for f in dataclasses.fields(cls)]
        props = [n for n, v in vars(cls).items() if isinstance(v, property)]
        assert [n for n in listed if n not in props] == fields, f"{cls.__name__}: docs {listed}, code {fields}"


def test_documented_errors_and_exit_codes():
    for base_cell, code, subs in table_rows(section("### Errors")):
        base = getattr(errors, base_cell.strip("`"))
        assert issubclass(base, errors.XenVtpmError) and base.exit_code == int(code.strip("`"))
        for name in re.findall(r"`(\w+)`", subs):
            assert issubclass(getattr(errors, name), base), name
    documented = set(re.findall(r"`(\w+)`", section("### Errors")))
    code_classes = {n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, errors.XenVtpmError)}
    assert code_classes - {"XenVtpmError", "NotFound"} <= documented | {"NotFound"}


def test_package_exports_and_type_stub_agree():
    stub = ast.parse((Path(xen_vtpm.__file__).with_suffix(".pyi")).read_text())
    imported = {a.name for node in stub.body if isinstance(node, ast.ImportFrom) for a in node.names}
    assert imported == set(api.__all__) == set(xen_vtpm.__all__) - {"__version__"}
    for name in api.__all__:
        assert getattr(xen_vtpm, name) is getattr(api, name)
    assert (Path(xen_vtpm.__file__).parent / "py.typed").exists()
    with pytest.raises(AttributeError):
        xen_vtpm.NoSuchThing  # noqa: B018
