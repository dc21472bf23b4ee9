"""The attacks on a move, tried for real: each is refused with nothing changed on either host.

* an untrusted source, an untrusted destination, a destination booted other than it was trusted with;
* a move without the TPM-checked secret that a rollback needs;
* a captured transfer: it opens with the destination's TPM and with no other, even given the
  destination's state dir; its manager envelope opens in no other manager, an swtpm vTPM's sealed
  keys with no other TPM;
* the captured transfer replayed, a transfer altered on the wire, a transfer cut short (an swtpm
  vTPM's too: its guest runs on, on the same swtpm, un-parked);
* no K, host key or sub-key in clear anywhere on either host or on the wire, during a move or after it.

Two hosts per module and a move per case take minutes on two cores: the whole file runs under
`make crash` (crash_full); `make test` moves a guest of each backend end to end (test_migrate.py).
"""
from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3

import pytest
from e2e_helpers import GUEST, provision_guest_tpm, tpm_state
from move_helpers import (
    SSH,
    capturing_ssh,
    ek_public,
    filtering_ssh,
    hello_values,
    live_entries,
    snapshot_of,
    two_hosts,
    vtpm_uuid,
)
from sim_fixture import swtpm_home, swtpm_pid
from test_security import (
    Secrets,
    _collect_ks,
    _host_key,
    _tool_async,
    _while_running,
    scan_files,
    scan_processes,
    scan_xenstore,
)
from tpm_fixture import Swtpm

from xen_vtpm.config import Config
from xen_vtpm.errors import ManagerError, TransferError
from xen_vtpm.host.identity import TpmIdentity
from xen_vtpm.host.keys import derive_keys
from xen_vtpm.host.session import close_all
from xen_vtpm.transfer import crypto
from xen_vtpm.transfer.wire import Opener
from xen_vtpm.vtpm.manager import ManagerClient
from xen_vtpm.vtpm.swtpm import derive_keys as swtpm_keys
from xen_vtpm.vtpm.swtpmmove import envelope_context

SECRET = b"move me only with this"


pytestmark = pytest.mark.crash_full

@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    base = tmp_path_factory.mktemp("mvsec")
    auth = base / "rollback.secret"
    auth.write_bytes(SECRET)
    with two_hosts(base, auth_file=auth) as p:
        provision_guest_tpm(p.a.tcti())
        p.auth = auth
        yield p


def _catalog_rows(host) -> dict[str, list]:
    db = sqlite3.connect(f"file:{host.catalog}?mode=ro", uri=True)
    try:
        return {t: db.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()
                for t in ("checkpoints", "audit", "head", "op_journal", "op_steps")}
    finally:
        db.close()


def _unchanged(host) -> dict:
    """What a refusal must leave exactly as it was (catalog rows, not file bytes: SQLite may
    checkpoint its WAL at any open)."""
    snap = snapshot_of(host)
    snap.pop("state")
    return {**snap, "catalog": _catalog_rows(host)}


@contextlib.contextmanager
def nothing_changes(pair, *, source_logs: bool = False):
    """The guest runs on A with its vTPM as before, B is exactly as before; A only logs the attempt
    when it got as far as journaling it (``source_logs``)."""
    tpm_before = tpm_state(pair.a.tcti())      # TPM commands save: read before the snapshots
    before_a, before_b = _unchanged(pair.a), _unchanged(pair.b)
    yield
    after_a = _unchanged(pair.a)
    if source_logs:
        # A suspended and resumed the guest, whose frontend then probes its TPM, and every command
        # saves: compare the vTPM by what the guest sees (below), its manager entry by its flags.
        for snap in (before_a, after_a):
            for table in ("audit", "head", "op_journal", "op_steps"):
                snap["catalog"].pop(table)
            snap["images"].pop(f"vtpm-{GUEST}.img")
            snap["manager"] = {u: flags for u, (flags, _) in snap["manager"].items()}
    assert after_a == before_a
    assert _unchanged(pair.b) == before_b
    assert not pair.a.is_paused(GUEST)
    assert tpm_state(pair.a.tcti()) == tpm_before


def _migrate(pair, *args, expect=0, ssh=None):
    kw = {"ssh": ssh} if ssh else {}
    return pair.migrate("--auth-file", str(pair.auth), *args, expect=expect, **kw)


def test_a_move_needs_the_rollback_secret(pair, tmp_path):
    wrong = tmp_path / "wrong"
    wrong.write_bytes(b"not it")
    with nothing_changes(pair):
        assert "rollback secret" in pair.a.fails(7, "migrate", "-s", "xen-vtpm sim ssh", GUEST, str(pair.b.dir))
        assert "refused the rollback secret" in pair.a.fails(7, "migrate", "--auth-file", str(wrong), "-s",
                                                             "xen-vtpm sim ssh", GUEST, str(pair.b.dir))


@pytest.mark.parametrize("untrusted,refusal", [("source", "is not trusted on this host"),
                                               ("destination", "is not trusted here")])
def test_an_untrusted_host_is_refused(pair, untrusted, refusal):
    """The destination refuses a source it does not trust, and the source a destination."""
    judge, peer, key = (pair.b, "hostA", "A") if untrusted == "source" else (pair.a, "hostB", "B")
    judge.tool("trust", "remove", peer)
    try:
        with nothing_changes(pair):
            line = pair.a.fails(7, "migrate", "--auth-file", str(pair.auth), "-s", "xen-vtpm sim ssh", GUEST,
                                str(pair.b.dir))
            assert refusal in line
    finally:
        judge.tool("trust", "add", peer, str(pair.keys[key]))


def test_a_destination_booted_otherwise_is_refused_when_pcrs_are_bound(pair, tmp_path):
    doc = json.loads(pair.keys["B"].read_text())
    doc["pcr_values"]["7"] = "11" * 32          # B's Secure Boot state when its key was exported
    other_boot = tmp_path / "B-other-boot.hostkey"
    other_boot.write_text(json.dumps(doc))
    pair.a.tool("trust", "remove", "hostB")
    try:
        pair.a.tool("trust", "add", "hostB", str(other_boot), "--bind-pcrs")
        with nothing_changes(pair):
            line = pair.a.fails(7, "migrate", "--auth-file", str(pair.auth), "-s", "xen-vtpm sim ssh", GUEST,
                                str(pair.b.dir))
            assert "boot PCRs differ" in line and "sha256:7" in line
    finally:
        pair.a.tool("trust", "remove", "hostB")
        pair.a.tool("trust", "add", "hostB", str(pair.keys["B"]), "--bind-pcrs")


@pytest.fixture(scope="module")
def captured(pair, tmp_path_factory):
    """A move A -> B (PCR-bound: the quote matched), recorded on the wire, and the guest moved back."""
    where = tmp_path_factory.mktemp("wire")
    ssh, from_s, from_d = capturing_ssh(where)
    uuid = vtpm_uuid(pair.a)
    _migrate(pair, ssh=ssh)
    assert GUEST in pair.b.domids()
    pair.b.tool("migrate", "-s", "xen-vtpm sim ssh", GUEST, str(pair.a.dir))
    assert GUEST in pair.a.domids()
    return {"from_s": from_s.read_bytes(), "from_d": from_d.read_bytes(), "uuid": uuid}


def _first_record(captured, z: bytes) -> bytes:
    v = hello_values(captured["from_s"], captured["from_d"])
    key = crypto.channel_key(z, v["nonce_s"], v["nonce_d"], v["transfer"], v["ephemeral"])
    return Opener(key, "capture").open(v["records"][0])[1]


def test_a_captured_transfer_opens_only_with_the_destination_tpm(pair, captured, tmp_path):
    v = hello_values(captured["from_s"], captured["from_d"])
    b_cfg = Config.load(pair.b.env["XEN_VTPM_CONFIG"])
    meta = json.loads(_first_record(captured, TpmIdentity(b_cfg, dict).zgen(v["ephemeral"])))
    assert meta["guest"] == GUEST                          # the destination's TPM opens it...
    close_all()
    other = Swtpm(tmp_path / "other-tpm")
    try:
        shutil.copytree(pair.b.state_dir, tmp_path / "b-state")    # ...B's files on another TPM do not
        stolen = Config(state_dir=tmp_path / "b-state", tcti=other.tcti, pcrs=b_cfg.pcrs)
        with pytest.raises(TransferError, match="does not authenticate"):
            _first_record(captured, TpmIdentity(stolen, dict).zgen(v["ephemeral"]))
    finally:
        close_all()
        other.stop()
    # The vTPM's secret inside is a manager envelope for B's manager: A's manager cannot open it.
    envelope = bytes.fromhex(meta["vtpm"]["envelope"])
    with ManagerClient(Config.load(pair.a.env["XEN_VTPM_CONFIG"])) as mgr:
        with pytest.raises(ManagerError, match="does not open with this manager's transfer key"):
            mgr.import_entry(captured["uuid"], v["transfer"], envelope)


def test_a_replayed_transfer_is_refused(pair, captured, tmp_path):
    replay = tmp_path / "replay"
    replay.write_bytes(captured["from_s"])
    with nothing_changes(pair):
        # Its stdout is the protocol's binary frames (to the source): only the exit code and stderr count.
        proc = pair.b.sim.run(["sh", "-c", f'xen-vtpm sim ssh "{pair.b.dir}" xen-vtpm migrate-receive < {replay} '
                               '> /dev/null'], check=False)
        assert proc.returncode == TransferError.exit_code, proc.stderr
        assert "replayed or forged" in proc.stderr
    assert captured["uuid"] not in live_entries(pair.b)


def test_an_altered_transfer_is_refused(pair, tmp_path):
    flip = filtering_ssh(tmp_path, "flip-ssh", flip=3 << 20)          # a byte of the guest's memory
    with nothing_changes(pair, source_logs=True):
        line = pair.a.fails(11, "migrate", "--auth-file", str(pair.auth), "-s", flip, GUEST, str(pair.b.dir))
        assert "refused the move" in line and "does not authenticate" in line


def test_a_truncated_transfer_is_refused(pair, tmp_path):
    cut = filtering_ssh(tmp_path, "cut-ssh", cut=2 << 20)
    with nothing_changes(pair, source_logs=True):
        line = pair.a.fails(11, "migrate", "--auth-file", str(pair.auth), "-s", cut, GUEST, str(pair.b.dir))
        assert "refused the move" in line and "truncated" in line


def test_no_secret_in_clear_during_and_after_a_move(pair, tmp_path):
    """The scan of test_security.py (files, XenStore of both hosts, every process's argv and
    environment), run while a move goes out and comes back, with the wire recorded too."""
    s = Secrets()
    for name, host in (("A", pair.a), ("B", pair.b)):
        key = _host_key(host)
        s.keys[f"host key {name}"] = key
        for sub, value in vars(derive_keys(key)).items():
            s.keys[f"sub-key {sub} of {name}"] = value
    _collect_ks(pair.a, s)                                  # the vTPM's K, which must open its image
    ssh, _, _ = capturing_ssh(tmp_path)
    roots = [pair.a.dir.parent, tmp_path]                   # both hosts, their tool dirs, the wire
    found: list[str] = []
    rounds = [0]

    def probe() -> list[str]:
        rounds[0] += 1
        out = scan_processes(s) + scan_xenstore(pair.a, s) + scan_xenstore(pair.b, s)
        return out + (scan_files(roots, s) if rounds[0] % 10 == 1 else [])
    for src, dst in ((pair.a, pair.b), (pair.b, pair.a)):
        args = ["--auth-file", str(pair.auth)] if src is pair.a else []
        found += _while_running(_tool_async(src, "migrate", *args, "-s", ssh, GUEST, str(dst.dir)), probe)
        found += scan_files(roots, s) + scan_xenstore(pair.a, s) + scan_xenstore(pair.b, s)
    assert rounds[0] > 2, "the moves ended before a scan ran"
    assert not found, "secrets found:\n" + "\n".join(sorted(set(found)))


# --- the same attacks on an swtpm vTPM (an HVM guest whose TPM is an swtpm in dom0) -------------------

HVM = "hvm1"


@pytest.fixture(scope="module")
def hvm(pair):
    pair.a.tool("sim", "create", HVM, "--memory", "16", "--vtpm", "swtpm")
    provision_guest_tpm(pair.a.tcti(HVM))
    yield swtpm_home(pair.a.sim, HVM).name
    for host in (pair.a, pair.b):
        if HVM in host.domids():
            host.xl("destroy", HVM)


@contextlib.contextmanager
def swtpm_unchanged(pair, uuid: str):
    """hvm1 runs on A on the same swtpm, not parked, its TPM as the guest saw it (the state file's bytes
    may move: `xl save` made swtpm write it); B holds nothing of it."""
    a, b = pair.a, pair.b
    tpm_before, ek_before = tpm_state(a.tcti(HVM)), ek_public(a.tcti(HVM))
    pid = swtpm_pid(a.sim, HVM)
    before_b = _unchanged(b)
    yield
    assert HVM in a.domids() and not a.is_paused(HVM)
    assert swtpm_pid(a.sim, HVM) == pid
    assert "parked" not in json.loads((swtpm_home(a.sim, HVM) / "vtpm.json").read_text())
    assert tpm_state(a.tcti(HVM)) == tpm_before and ek_public(a.tcti(HVM)) == ek_before
    assert _unchanged(b) == before_b and not (b.state_dir / "swtpm" / uuid).exists()


def test_a_captured_swtpm_transfer_opens_only_with_the_destination_tpm(pair, hvm, tmp_path):
    """The vTPM's keys travel sealed twice to B's TPM (the channel, and their own envelope): B's TPM
    opens both, and they are the vTPM's keys; B's files on another TPM open neither."""
    ssh, from_s, from_d = capturing_ssh(tmp_path)
    pair.migrate("--auth-file", str(pair.auth), ssh=ssh, guest=HVM)
    assert HVM in pair.b.domids()
    pair.b.tool("migrate", "-s", SSH, HVM, str(pair.a.dir))
    assert HVM in pair.a.domids()
    wire = {"from_s": from_s.read_bytes(), "from_d": from_d.read_bytes()}
    v = hello_values(wire["from_s"], wire["from_d"])
    b_cfg = Config.load(pair.b.env["XEN_VTPM_CONFIG"])
    b_tpm = TpmIdentity(b_cfg, dict)
    meta = json.loads(_first_record(wire, b_tpm.zgen(v["ephemeral"])))
    assert meta["guest"] == HVM and meta["vtpm"]["kind"] == "swtpm"
    envelope, context = bytes.fromhex(meta["vtpm"]["envelope"]), envelope_context(v["transfer"], hvm)
    state_key, migration_key = swtpm_keys(derive_keys(_host_key(pair.a)).swtpm, hvm)
    assert crypto.open_envelope(b_tpm.zgen, context, envelope, "B") == state_key + migration_key
    close_all()
    other = Swtpm(tmp_path / "other-tpm")
    try:
        shutil.copytree(pair.b.state_dir, tmp_path / "b-state")
        stolen = TpmIdentity(Config(state_dir=tmp_path / "b-state", tcti=other.tcti, pcrs=b_cfg.pcrs), dict)
        with pytest.raises(TransferError, match="does not authenticate"):
            _first_record(wire, stolen.zgen(v["ephemeral"]))
        with pytest.raises(TransferError, match="does not open with this host's transfer key"):
            crypto.open_envelope(stolen.zgen, context, envelope, "another TPM")
    finally:
        close_all()
        other.stop()


@pytest.mark.parametrize("attack,refusal", [("flip", "does not authenticate"), ("cut", "truncated")])
def test_an_altered_swtpm_transfer_is_refused(pair, hvm, tmp_path, attack, refusal):
    ssh = filtering_ssh(tmp_path, f"{attack}-ssh", **{attack: 3 << 20})      # in the guest's memory
    with swtpm_unchanged(pair, hvm):
        line = pair.a.fails(11, "migrate", "--auth-file", str(pair.auth), "-s", ssh, HVM, str(pair.b.dir))
        assert "refused the move" in line and refusal in line
