"""Shared helpers for the end-to-end tests (tests/test_e2e_*.py).

* `E2EHost`: a simulated host, initialised, with guest1 (16 MiB) and its vTPM of one backend (BACKENDS:
  a vTPM stub domain, or an swtpm behind an HVM guest's device model); `xen-vtpm` is driven as a
  subprocess (`python -m xen_vtpm ...`) with the host's environment, exactly as an administrator would.
  Its config points `xl` at a recording wrapper: every `xl save` stream is also kept in a file, so a test
  knows the guest memory at the instant the tool captured it (a paused guest cannot be snapshotted:
  it could not suspend itself).
* Guest-side TPM access over the vTPM's TCTI: with tpm2-pytss ESAPI for the TPM 2.0 stand-in (PCR
  extend/read, an NV counter, a persistent object and its name), with raw TPM 1.2 commands for Xen's own
  TPM 1.2 vTPM (PCR extend/read, an NV index, the endorsement key); ``E2EHost.tpm_state`` and friends pick
  the client of the guest's TPM version.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import shlex
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tpm12
from sim_fixture import SimHost, start_sim_host, stop_sim_host, swtpm_pid, swtpm_state_fingerprints
from tpm2_pytss import ESAPI, TCTILdr
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_NT, TPMA_NV
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.types import (
    TPM2B_NV_PUBLIC,
    TPM2B_PUBLIC,
    TPML_DIGEST_VALUES,
    TPML_PCR_SELECTION,
    TPMS_NV_PUBLIC,
    TPMT_HA,
    TPMU_HA,
)

from xen_vtpm.vtpm.vtpmblk import slot_fingerprints
from xen_vtpm_sim.savestream import read_save

GUEST = "guest1"
GUEST_MIB = 16
BACKENDS = ("stubdom", "swtpm")
PCR = 16
NV_INDEX = 0x01800010
PERSISTENT = 0x81000010

# The wrapper keeps a copy of each save stream; every other command goes to the sim host's xl untouched.
_XL_WRAPPER = """#!/bin/sh
real={real}
records={records}
if [ "$1" = save ]; then
    shift
    flags=
    while [ $# -gt 0 ] && [ "${{1#-}}" != "$1" ]; do flags="$flags $1"; shift; done
    dom=$1
    out=$2
    shift 2
    n=$(ls "$records" | wc -l)
    rec="$records/save-$(printf %04d "$n")"
    "$real" save $flags "$dom" "$rec.part" "$@" || exit $?
    mv "$rec.part" "$rec"
    printf '%s\n' "$out" >> "$records.targets"
    cat "$rec" > "$out" || exit 1
    exit 0
fi
exec "$real" "$@"
"""


# --- CLI ---------------------------------------------------------------------------------

def assert_one_line_error(proc: subprocess.CompletedProcess) -> str:
    """A failing command explains itself on exactly one stderr line, never with a traceback."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{proc.stderr}"
    assert lines[0].startswith("xen-vtpm: "), lines[0]
    return lines[0]


@dataclass
class E2EHost:
    sim: SimHost
    env: dict[str, str]
    records: Path
    backend: str = "stubdom"
    tpm_version: str = "2.0"

    @property
    def dir(self) -> Path:
        return self.sim.dir

    @property
    def state_dir(self) -> Path:
        return self.sim.dir / "state"

    @property
    def catalog(self) -> Path:
        return self.state_dir / "catalog.sqlite"

    # -- the tool
    def tool(self, *args: str, expect: int = 0, timeout: float = 120) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "xen_vtpm", *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == expect, (f"xen-vtpm {' '.join(args)}: exit {proc.returncode}, expected {expect}\n"
                                           f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
        if expect != 0:
            assert_one_line_error(proc)
        return proc

    def tool_json(self, *args: str) -> Any:
        return json.loads(self.tool("--json", *args).stdout)

    def fails(self, expect: int, *args: str) -> str:
        """Run a command that must fail with `expect`; return its one stderr line."""
        return assert_one_line_error(self.tool(*args, expect=expect))

    def snapshot(self, name: str, guest: str = GUEST) -> dict:
        return self.tool_json("snapshot", guest, "--name", name)

    def checkpoint_ids(self) -> set[str]:
        with contextlib.closing(sqlite3.connect(self.catalog)) as db:
            return {row[0] for row in db.execute("SELECT id FROM checkpoints")}

    # -- xl and the simulated domains
    def xl(self, *args: str) -> subprocess.CompletedProcess:
        return self.sim.xl(*args)

    def domids(self) -> dict[str, int]:
        rows = self.xl("list").stdout.splitlines()[1:]
        return {r.split()[0]: int(r.split()[1]) for r in rows if r.strip()}

    def is_paused(self, name: str = GUEST) -> bool:
        for row in self.xl("list").stdout.splitlines()[1:]:
            cols = row.split()
            if cols and cols[0] == name:
                return "p" in cols[4]
        raise AssertionError(f"{name} is not running")

    def memdigest(self, guest: str = GUEST) -> str:
        return self.tool("sim", "memdigest", guest).stdout.strip()

    def tcti(self, guest: str = GUEST) -> str:
        """The guest's vTPM; re-read after every rollback/restore (a new stub domain, a new port)."""
        return self.tool("sim", "tcti", guest).stdout.strip()

    def vtpm_tcti(self, backend: str = f"vtpm-{GUEST}") -> str:
        """The vTPM stub domain's TCTI while its guest is saved (no guest to look it up by)."""
        return (self.dir / "run" / f"{backend}.tcti").read_text().strip()

    # -- the guest's TPM, through the client of its TPM version (tcti: the guest's vTPM by default)
    def tpm_state(self, tcti: str | None = None) -> dict[str, Any]:
        return GUEST_TPM[self.tpm_version].state(tcti or self.tcti())

    def provision_tpm(self, tcti: str | None = None) -> dict[str, Any]:
        return GUEST_TPM[self.tpm_version].provision(tcti or self.tcti())

    def advance_tpm(self, tag: bytes, tcti: str | None = None) -> dict[str, Any]:
        return GUEST_TPM[self.tpm_version].advance(tcti or self.tcti(), tag)

    def vtpm_image(self, backend: str = f"vtpm-{GUEST}") -> Path:
        return self.dir / "images" / f"{backend}.img"

    def slot_fingerprints(self, backend: str = f"vtpm-{GUEST}") -> tuple[str | None, ...]:
        """Fingerprints of the vTPM's persistent state: the stub domain's image slots, or swtpm's state
        files (any write to either changes them)."""
        if self.backend == "swtpm":
            return swtpm_state_fingerprints(self.sim)
        return slot_fingerprints(self.vtpm_image(backend).read_bytes())

    def vtpm_instance(self) -> int | None:
        """What serves guest1's vTPM right now: its stub domain's domid, or its swtpm's pid."""
        if self.backend == "swtpm":
            return swtpm_pid(self.sim)
        return self.domids().get(f"vtpm-{GUEST}")

    # -- what the tool captured
    def last_save_record(self) -> Path:
        recs = sorted(p for p in self.records.iterdir() if not p.name.endswith(".part"))
        assert recs, "no xl save stream was recorded"
        return recs[-1]

    def last_save_target(self) -> str:
        """Where the tool told `xl save` to write, last time (its spool, or the save file)."""
        return Path(f"{self.records}.targets").read_text().splitlines()[-1]

    def with_config(self, where: Path, **keys: object) -> E2EHost:
        """The same host, the tool run with some config keys changed."""
        lines = [ln for ln in Path(self.env["XEN_VTPM_CONFIG"]).read_text().splitlines()
                 if ln.split("=")[0].strip() not in keys]
        config = where / "xen-vtpm.conf"
        config.write_text("\n".join([*lines, *(f"{k} = {v}" for k, v in keys.items())]) + "\n")
        return E2EHost(sim=self.sim, env=dict(self.env, XEN_VTPM_CONFIG=str(config)), records=self.records,
                       backend=self.backend, tpm_version=self.tpm_version)


def saved_memory_digest(save_file: Path, mib: int = GUEST_MIB) -> str:
    """SHA-256 of the guest memory carried by an xl save image (what `sim memdigest` gives once restored)."""
    memory = bytearray(mib << 20)
    with open(save_file, "rb") as fh:
        read_save(fh, memory)
    return hashlib.sha256(memory).hexdigest()


def _install_recording_xl(sim: SimHost, where: Path) -> tuple[Path, Path]:
    records = where / "saves"
    records.mkdir()
    wrapper = where / "xl"
    wrapper.write_text(_XL_WRAPPER.format(real=shlex.quote(str(sim.dir / "bin" / "xl")),
                                          records=shlex.quote(str(records))))
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    text = sim.config.read_text()
    lines = [f"xl = {wrapper}" if ln.startswith("xl =") else ln for ln in text.splitlines()]
    assert any(ln.startswith("xl =") for ln in text.splitlines()), "sim config has no xl line"
    config = where / "xen-vtpm.conf"
    config.write_text("\n".join(lines) + "\n")
    return config, records


@contextlib.contextmanager
def e2e_host(base: Path, *, stock_manager: bool = False, auth_file: Path | None = None,
             backend: str = "stubdom", tpm_version: str = "2.0", **platform: object) -> Iterator[E2EHost]:
    """An initialised simulated host with guest1 running on a vTPM of ``backend`` (a stub domain with a TPM
    ``tpm_version``, or swtpm: TPM 2.0); always taken down.  ``platform``: the Xen traps the host reproduces
    (`sim up` options: xsm=, provisioned=, console_log=, release_delay=)."""
    sim = start_sim_host(base / "h", stock_manager=stock_manager, **platform)
    try:
        tooldir = base / "tool"
        tooldir.mkdir()
        config, records = _install_recording_xl(sim, tooldir)
        host = E2EHost(sim=sim, env=dict(sim.env, XEN_VTPM_CONFIG=str(config)), records=records, backend=backend,
                       tpm_version=tpm_version)
        host.tool("init", *(["--rollback-auth-file", str(auth_file)] if auth_file else []))
        host.tool("sim", "create", GUEST, "--memory", str(GUEST_MIB), "--vtpm", backend,
                  "--tpm-version", tpm_version)
        yield host
    finally:
        stop_sim_host(sim)


# --- guest-side TPM (tpm2-pytss ESAPI) ---------------------------------------------------

@contextlib.contextmanager
def esapi(tcti: str) -> Iterator[ESAPI]:
    with ESAPI(TCTILdr.parse(tcti)) as ectx:
        yield ectx


def pcr_extend(tcti: str, data: bytes, pcr: int = PCR) -> None:
    digest = TPMU_HA(sha256=hashlib.sha256(data).digest())
    digests = TPML_DIGEST_VALUES([TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=digest)])
    with esapi(tcti) as ectx:
        ectx.pcr_extend(ESYS_TR.parse(f"pcr{pcr}"), digests)


def pcr_read(tcti: str, pcr: int = PCR) -> bytes:
    with esapi(tcti) as ectx:
        _, _, values = ectx.pcr_read(TPML_PCR_SELECTION.parse(f"sha256:{pcr}"))
    return bytes(values[0])


def _nv_handle(ectx: ESAPI) -> ESYS_TR:
    return ectx.tr_from_tpmpublic(NV_INDEX)


def nv_define_counter(tcti: str) -> None:
    """An owner-created TPM counter index, incremented once so that it can be read."""
    attrs = (TPMA_NV.AUTHREAD | TPMA_NV.AUTHWRITE | TPMA_NV.NO_DA
             | (TPM2_NT.COUNTER << TPMA_NV.TPM2_NT_SHIFT))
    public = TPM2B_NV_PUBLIC(nvPublic=TPMS_NV_PUBLIC(nvIndex=NV_INDEX, nameAlg=TPM2_ALG.SHA256,
                                                     attributes=attrs, dataSize=8))
    with esapi(tcti) as ectx:
        handle = ectx.nv_define_space(b"", public)
        ectx.nv_increment(handle)


def nv_increment(tcti: str) -> None:
    with esapi(tcti) as ectx:
        ectx.nv_increment(_nv_handle(ectx))


def nv_read(tcti: str) -> int:
    with esapi(tcti) as ectx:
        return int.from_bytes(bytes(ectx.nv_read(_nv_handle(ectx), 8)), "big")


def persistent_replace(tcti: str, tag: bytes) -> bytes:
    """Put a new primary key (its unique field derived from tag) at PERSISTENT; return its name."""
    template = TPM2B_PUBLIC.parse("ecc256")
    template.publicArea.unique.ecc.x = hashlib.sha256(b"x" + tag).digest()
    template.publicArea.unique.ecc.y = hashlib.sha256(b"y" + tag).digest()
    with esapi(tcti) as ectx:
        with contextlib.suppress(TSS2_Exception):  # nothing there yet
            old = ectx.tr_from_tpmpublic(PERSISTENT)
            ectx.evict_control(ESYS_TR.OWNER, old, PERSISTENT)
        handle, _, _, _, _ = ectx.create_primary(None, template)
        try:
            persistent = ectx.evict_control(ESYS_TR.OWNER, handle, PERSISTENT)
        finally:
            ectx.flush_context(handle)
        return bytes(ectx.tr_get_name(persistent))


def persistent_name(tcti: str) -> bytes:
    with esapi(tcti) as ectx:
        _, name, _ = ectx.read_public(ectx.tr_from_tpmpublic(PERSISTENT))
        return bytes(name)


def tpm_state(tcti: str) -> dict[str, Any]:
    """What a guest can observe of its vTPM: the PCR, the NV counter and the persistent object's name."""
    return {"pcr": pcr_read(tcti).hex(), "counter": nv_read(tcti), "persistent": persistent_name(tcti).hex()}


def provision_guest_tpm(tcti: str) -> dict[str, Any]:
    """Give a fresh vTPM the objects the tests observe; return the resulting state."""
    nv_define_counter(tcti)
    persistent_replace(tcti, b"initial")
    pcr_extend(tcti, b"initial")
    return tpm_state(tcti)


def advance_guest_tpm(tcti: str, tag: bytes) -> dict[str, Any]:
    """Change everything tpm_state observes; return the new state."""
    before = tpm_state(tcti)
    pcr_extend(tcti, tag)
    nv_increment(tcti)
    persistent_replace(tcti, tag)
    after = tpm_state(tcti)
    assert all(after[k] != before[k] for k in before), (before, after)
    return after


# --- guest-side TPM 1.2 (raw commands, tests/tpm12.py) --------------------------------------------
NV12_SIZE = 8


def tpm12_state(tcti: str) -> dict[str, Any]:
    """What a TPM 1.2 guest observes: PCR 16, its NV index and its endorsement key (its identity)."""
    return {"pcr": tpm12.pcr_read(tcti, PCR).hex(), "nv": tpm12.nv_read(tcti, NV12_SIZE).hex(),
            "ek": tpm12.pubek_digest(tcti)}


def tpm12_provision(tcti: str) -> dict[str, Any]:
    tpm12.nv_define(tcti, NV12_SIZE)
    tpm12.nv_write(tcti, hashlib.sha1(b"initial").digest()[:NV12_SIZE])
    tpm12.pcr_extend(tcti, PCR, b"initial")
    return tpm12_state(tcti)


def tpm12_advance(tcti: str, tag: bytes) -> dict[str, Any]:
    """Change the PCR and the NV data (the EK is the vTPM's identity and stays); return the new state."""
    before = tpm12_state(tcti)
    tpm12.pcr_extend(tcti, PCR, tag)
    tpm12.nv_write(tcti, hashlib.sha1(tag).digest()[:NV12_SIZE])
    after = tpm12_state(tcti)
    assert after["pcr"] != before["pcr"] and after["nv"] != before["nv"] and after["ek"] == before["ek"], \
        (before, after)
    return after


@dataclass(frozen=True)
class GuestTpmClient:
    state: Any
    provision: Any
    advance: Any


GUEST_TPM = {"2.0": GuestTpmClient(tpm_state, provision_guest_tpm, advance_guest_tpm),
             "1.2": GuestTpmClient(tpm12_state, tpm12_provision, tpm12_advance)}
TPM_VERSIONS = tuple(GUEST_TPM)
# Every vTPM a synchronized rollback must work on: Xen's stub domain with its TPM 1.2 and with the
# simulator's TPM 2.0 stand-in, and swtpm in dom0 (TPM 2.0) for an HVM guest.
VTPMS = {"stubdom-tpm2.0": ("stubdom", "2.0"), "stubdom-tpm1.2": ("stubdom", "1.2"), "swtpm": ("swtpm", "2.0")}
