"""End to end: any changed stored byte makes `verify` and `rollback` exit 5 and touch nothing running.

Each case takes its own snapshot, changes one thing in the state dir the way an attacker with dom0 file
access could (a pack byte, a manifest file byte, a catalog row, the vTPM image chunk), runs the tool,
checks that the guest, its vTPM stub domain and the vTPM state are exactly as before, and puts the
byte back so the next case starts from a healthy store.  Every case runs on the vTPM stub domain; on
swtpm the default run takes the cases where the backend's own capture or a pack entry is damaged, and
`make crash` (crash_full) the rest.
"""
from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from e2e_helpers import BACKENDS, GUEST, E2EHost, e2e_host, provision_guest_tpm, tpm_state

from xen_vtpm.store import manifest as manifest_format


@pytest.fixture(scope="module")
def host(tmp_path_factory, request):
    with e2e_host(tmp_path_factory.mktemp("tamper"), backend=request.param) as h:
        provision_guest_tpm(h.tcti())
        yield h


# --- reading the store the way docs/formats.md, "Checkpoint store" describes it ---------------------------

def _db(host: E2EHost) -> sqlite3.Connection:
    return sqlite3.connect(host.catalog, isolation_level=None)


def _streams(host: E2EHost, ckpt: str) -> dict[str, list[bytes]]:
    """Chunk ids per stream, from the manifest file (its body is plain; only the MAC needs the key)."""
    data = (host.state_dir / "manifests" / f"{ckpt}.manifest").read_bytes()
    parsed = manifest_format.parse(data[:-manifest_format.MAC_SIZE], ckpt)
    return {rec.name: [cid for cid, _ in rec.chunks] for rec in parsed.streams}


def _place(host: E2EHost, chunk_id: bytes) -> tuple[Path, int, int, int]:
    with contextlib.closing(_db(host)) as db:
        pack, offset, length, refcount = db.execute(
            "SELECT pack, offset, length, refcount FROM chunks WHERE id = ?", (chunk_id,)).fetchone()
    return host.state_dir / "packs" / f"{pack}.pack", offset, length, refcount


def _own_chunk(host: E2EHost, ckpt: str, stream: str) -> bytes:
    """A chunk of `stream` that only this checkpoint uses (so the damage is surely this checkpoint's)."""
    for cid in _streams(host, ckpt)[stream]:
        if _place(host, cid)[3] == 1:
            return cid
    raise AssertionError(f"{ckpt}: no chunk of {stream} is unique to it")


def _flip_file_byte(path: Path, offset: int) -> Callable[[], None]:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        old = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([old[0] ^ 0x01]))

    def undo() -> None:
        with open(path, "r+b") as fh:
            fh.seek(offset)
            fh.write(old)
    return undo


def _update_row(host: E2EHost, sql_set: str, sql_undo: str, args: tuple) -> Callable[[], None]:
    with contextlib.closing(_db(host)) as db:
        assert db.execute(sql_set, args).rowcount == 1

    def undo() -> None:
        with contextlib.closing(_db(host)) as db:
            assert db.execute(sql_undo, args).rowcount == 1
    return undo


# --- the tampering cases --------------------------------------------------------------------

def tamper_pack_chunk(host: E2EHost, ckpt: str) -> Callable[[], None]:
    pack, offset, length, _ = _place(host, _own_chunk(host, ckpt, "memory"))
    return _flip_file_byte(pack, offset + 48 + length // 2)   # inside the sealed bytes


def tamper_pack_index(host: E2EHost, ckpt: str) -> Callable[[], None]:
    pack, _, _, _ = _place(host, _own_chunk(host, ckpt, "memory"))
    size = pack.stat().st_size
    return _flip_file_byte(pack, size - 56 - 44 + 33)   # last index record: its entry offset


def tamper_vtpm_image_chunk(host: E2EHost, ckpt: str) -> Callable[[], None]:
    pack, offset, length, _ = _place(host, _own_chunk(host, ckpt, "vtpm-image"))
    return _flip_file_byte(pack, offset + 48 + length // 2)


def tamper_manifest_file(host: E2EHost, ckpt: str) -> Callable[[], None]:
    path = host.state_dir / "manifests" / f"{ckpt}.manifest"
    return _flip_file_byte(path, path.stat().st_size // 2)


def tamper_catalog_name(host: E2EHost, ckpt: str) -> Callable[[], None]:
    return _update_row(host, "UPDATE checkpoints SET name = name || '-x' WHERE id = ?",
                       "UPDATE checkpoints SET name = substr(name, 1, length(name) - 2) WHERE id = ?", (ckpt,))


def tamper_catalog_manifest(host: E2EHost, ckpt: str) -> Callable[[], None]:
    with contextlib.closing(_db(host)) as db:
        (blob,) = db.execute("SELECT manifest FROM checkpoints WHERE id = ?", (ckpt,)).fetchone()
    bad = bytearray(blob)
    bad[len(bad) // 2] ^= 0x01   # in the body: the MAC (which the catalog head covers) stays as it was
    with contextlib.closing(_db(host)) as db:
        db.execute("UPDATE checkpoints SET manifest = ? WHERE id = ?", (bytes(bad), ckpt))

    def undo() -> None:
        with contextlib.closing(_db(host)) as db:
            db.execute("UPDATE checkpoints SET manifest = ? WHERE id = ?", (blob, ckpt))
    return undo


def tamper_catalog_chunk_offset(host: E2EHost, ckpt: str) -> Callable[[], None]:
    cid = _own_chunk(host, ckpt, "memory")
    return _update_row(host, "UPDATE chunks SET offset = offset + 1 WHERE id = ?",
                       "UPDATE chunks SET offset = offset - 1 WHERE id = ?", (cid,))


CASES = [tamper_pack_chunk, tamper_pack_index, tamper_vtpm_image_chunk, tamper_manifest_file,
         tamper_catalog_name, tamper_catalog_manifest, tamper_catalog_chunk_offset]


def _observe(host: E2EHost) -> tuple[dict, tuple]:
    """Everything a refused command must leave alone, and the vTPM slot fingerprints after our own
    reads: every TPM command (a PCR read included) rewrites the vTPM image, so the next observation's
    "slots" must equal these."""
    state = {"slots": host.slot_fingerprints(), "domids": host.domids(), "vtpm": host.vtpm_instance(),
             "memory": host.memdigest(),
             "paused": host.is_paused(GUEST), "checkpoints": host.checkpoint_ids(), "tpm": tpm_state(host.tcti())}
    return state, host.slot_fingerprints()


# On swtpm the default run damages its own capture (the vTPM image chunk) and a pack entry; the other cases
# are the same store code with the same checks, and run there under crash_full (`make crash`).
SWTPM_DEFAULT = (tamper_vtpm_image_chunk, tamper_pack_chunk)


@pytest.mark.parametrize("host,tamper", [
    pytest.param(backend, tamper, id=f"{backend}-{tamper.__name__.removeprefix('tamper_')}",
                 marks=[pytest.mark.crash_full] if backend == "swtpm" and tamper not in SWTPM_DEFAULT else [])
    for backend in BACKENDS for tamper in CASES], indirect=["host"])
def test_tampered_checkpoint_is_refused_and_nothing_changes(host, tamper):
    name = f"t-{tamper.__name__.removeprefix('tamper_')}"
    ckpt = host.snapshot(name)["id"]
    host.tool("verify", ckpt)   # healthy before the damage

    audit_seq = max(r["seq"] for r in host.tool_json("audit"))
    undo = tamper(host, ckpt)
    try:
        host.xl("pause", GUEST)   # a stable memory image to compare
        before, slots = _observe(host)
        # `verify` by id and --all; `rollback` by id (the name is one of the things tampered with),
        # with and without the safety checkpoint.
        for group in ([["verify", ckpt], ["verify", "--all"]], [["rollback", GUEST, ckpt, "--yes"]],
                      [["rollback", GUEST, ckpt, "--yes", "--no-safety-checkpoint"]]):
            for argv in group:
                host.fails(5, *argv)
            after, next_slots = _observe(host)
            assert after == dict(before, slots=slots), f"{group} changed the running VM or its vTPM"
            slots = next_slots
        # Each refusal is a security event: all four are in the audit log, which still verifies.
        refusals = [r for r in host.tool_json("audit")
                    if r["seq"] > audit_seq and r["result"].startswith("refused")]
        assert [r["action"] for r in refusals] == ["verify", "verify", "rollback", "rollback"], refusals
        host.tool("audit", "--verify")
    finally:
        undo()
        if GUEST in host.domids() and host.is_paused(GUEST):
            host.xl("unpause", GUEST)
    host.tool("verify", ckpt)   # the undo really restored the store: the next case starts healthy
