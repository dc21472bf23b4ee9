"""The move protocol (xen_vtpm/transfer) on its own: two hosts' TPM identities (a real swtpm each), the
two session ends over pipes, no Xen.  Each check is tried against a forgery that must be refused."""
from __future__ import annotations

import dataclasses
import json
import os
import threading

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from tpm_fixture import Swtpm, make_cfg

from xen_vtpm.errors import MoveInDoubt, TransferError, UntrustedPeer, UsageError
from xen_vtpm.host.identity import TpmIdentity
from xen_vtpm.host.session import close_all
from xen_vtpm.transfer import crypto
from xen_vtpm.transfer.peer import HostKey, TrustedPeer
from xen_vtpm.transfer.session import Incoming, Outgoing, outcome_message, read_outcome, send_outcome
from xen_vtpm.transfer.wire import Opener, Sealer, Wire

MANAGER_KEY = {"stubdom": crypto.encode_point(ec.generate_private_key(ec.SECP256R1()).public_key())}


@pytest.fixture(scope="module")
def identities(tmp_path_factory):
    """Two hosts' identities, each on its own TPM."""
    tpms, ids = [], []
    try:
        for name in ("a", "b"):
            base = tmp_path_factory.mktemp(name)
            tpms.append(Swtpm(base / "tpm"))
            (base / "state").mkdir(mode=0o700)
            ids.append(TpmIdentity(make_cfg(base, tpms[-1].tcti), lambda: MANAGER_KEY))
        yield ids
    finally:
        close_all()
        for tpm in tpms:
            tpm.stop()


def _trusted(identity: TpmIdentity, name: str, bind_pcrs: bool = False) -> TrustedPeer:
    return TrustedPeer(name, identity.host_key(), bind_pcrs, "now")


class Pipes:
    """Two byte pipes: the source's end and the destination's end of one connection."""

    def __init__(self) -> None:
        s_to_d, d_to_s = os.pipe(), os.pipe()
        self.source = Wire(os.fdopen(d_to_s[0], "rb"), os.fdopen(s_to_d[1], "wb"), "dest")
        self.dest = Wire(os.fdopen(s_to_d[0], "rb"), os.fdopen(d_to_s[1], "wb"), "source")


def _session(identities, *, trust_source=True, trust_dest=True, bind=False):
    a, b = identities
    pipes = Pipes()
    out = Outgoing(pipes.source, a, lambda k: _trusted(b, "B", bind) if trust_dest and k == b.host_key().sign_key
                   else None)
    inc = Incoming(pipes.dest, b, lambda k: _trusted(a, "A") if trust_source and k == a.host_key().sign_key
                   else None, lambda t: open(os.devnull))
    return out, inc, pipes


def _run_both(source, dest):
    """Run the destination's part on a thread; return (source result, destination result or error)."""
    box: dict = {}

    def run():
        try:
            box["dest"] = dest()
        except Exception as exc:  # noqa: BLE001 - handed to the test
            box["dest"] = exc
    t = threading.Thread(target=run)
    t.start()
    try:
        result = source()
    finally:
        t.join(30)
    return result, box.get("dest")


def test_a_session_opens_only_for_the_destination_and_counts_its_records(identities):
    out, inc, _ = _session(identities)

    def dest():
        inc.hello()
        inc.accept_channel()
        got = list(inc.records())
        inc.answer("committed")
        return got

    def source():
        out.hello()
        out.open_channel()
        out.send(b"M", b"meta")
        out.send(b"G", os.urandom(1000))
        out.end()
        return out.outcome()
    outcome, got = _run_both(source, dest)
    assert outcome == "committed"
    assert [k for k, _ in got] == [b"M", b"G"]


def test_an_untrusted_source_or_destination_is_refused(identities):
    out, inc, _ = _session(identities, trust_source=False)

    def dest():
        try:
            inc.hello()
        except UntrustedPeer as exc:
            inc.refuse(exc)
            raise
    _, err = _run_both(lambda: pytest.raises(UntrustedPeer, out.hello), dest)
    assert isinstance(err, UntrustedPeer) and "is not trusted on this host" in str(err)
    out, inc, pipes = _session(identities, trust_dest=False)
    result, _ = _run_both(lambda: pytest.raises(UntrustedPeer, out.hello), inc.hello)
    assert "is not trusted here" in str(result.value)
    pipes.source.wfile.close()


def test_bound_pcrs_must_match_the_quote(identities):
    a, b = identities
    out, inc, pipes = _session(identities, bind=True)
    key = b.host_key()
    other_boot = dataclasses.replace(key, pcr_values={**key.pcr_values, 7: b"\x11" * 32})
    out.trust = lambda k: TrustedPeer("B", other_boot, True, "now") if k == key.sign_key else None
    result, _ = _run_both(lambda: pytest.raises(UntrustedPeer, out.hello), inc.hello)
    assert "boot PCRs differ" in str(result.value) and "sha256:7" in str(result.value)
    pipes.source.wfile.close()


def test_a_quote_is_checked_whole(identities):
    """The destination's quote: its signer, its nonce, its PCR values and its selection."""
    _, b = identities
    key = b.host_key()
    q = b.quote(b"q" * 32)
    pcrs = list(q.pcrs)
    crypto.verify_quote(key.sign_key, q.attest, q.signature, b"q" * 32, pcrs, q.values, "B")
    bad = {
        "not signed by its trusted host key": (identities[0].host_key().sign_key, q.attest, b"q" * 32, pcrs, q.values),
        "for another session": (key.sign_key, q.attest, b"r" * 32, pcrs, q.values),
        "does not match the PCR values": (key.sign_key, q.attest, b"q" * 32, pcrs, {**q.values, pcrs[0]: b"\1" * 32}),
        "covers other PCRs": (key.sign_key, q.attest, b"q" * 32, pcrs[1:], {p: q.values[p] for p in pcrs[1:]}),
    }
    for why, (signer, attest, nonce, sel, values) in bad.items():
        with pytest.raises(TransferError, match=why):
            crypto.verify_quote(signer, attest, q.signature, nonce, sel, values, "B")


def test_records_cannot_be_dropped_reordered_replayed_or_altered():
    key = os.urandom(32)
    seal = Sealer(key)
    records = [seal.seal(b"G", bytes([i]) * 100) for i in range(3)]
    opener = Opener(key, "source")
    assert opener.open(records[0]) == (b"G", bytes(100))
    altered = records[1][:-1] + bytes([records[1][-1] ^ 1])
    for bad in (records[2], records[0], altered):         # record 1 dropped, record 0 replayed, altered
        with pytest.raises(TransferError, match="does not authenticate"):
            opener.open(bad)
    assert opener.open(records[1]) == (b"G", b"\1" * 100)   # the right one still opens, in its place
    with pytest.raises(TransferError, match="does not authenticate"):
        Opener(os.urandom(32), "source").open(records[0])


def test_the_channel_key_needs_the_destination_tpm(identities):
    a, b = identities
    eph, z = crypto.ephemeral(b.host_key().transfer_key)
    assert b.zgen(eph) == z
    assert a.zgen(eph) != z


def test_an_outcome_must_be_signed_by_the_destination(identities):
    a, b = identities
    pipes = Pipes()
    send_outcome(pipes.dest, b, "t-1", "committed")
    assert read_outcome(pipes.source, "t-1", b.host_key().sign_key) == "committed"
    send_outcome(pipes.dest, a, "t-1", "committed")                      # signed by someone else
    with pytest.raises(MoveInDoubt, match="not signed by its trusted host key"):
        read_outcome(pipes.source, "t-1", b.host_key().sign_key)
    send_outcome(pipes.dest, b, "t-2", "committed")                      # another transfer's outcome
    with pytest.raises(MoveInDoubt, match="another transfer"):
        read_outcome(pipes.source, "t-1", b.host_key().sign_key)
    assert crypto.verify_signature(b.host_key().sign_key, outcome_message("t-1", "aborted: x"),
                                   b.sign(outcome_message("t-1", "aborted: x")))


def test_a_host_key_document_round_trips_and_refuses_edits(identities):
    key = identities[0].host_key()
    doc = json.loads(json.dumps(key.to_doc()))
    assert HostKey.from_doc(doc, "a.json") == key
    edited = dict(doc, sign_key=identities[1].host_key().sign_key.hex())
    with pytest.raises(UsageError, match="does not match its key"):
        HostKey.from_doc(edited, "a.json")
    with pytest.raises(UsageError, match="not a P-256 public key"):
        HostKey.from_doc(dict(doc, transfer_key="00" * 64, fingerprint=None), "a.json")
