"""Manifest record: canonical encoding, MAC, and a parser that turns any bad input into IntegrityError."""
from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_store_helpers import KEYS, OTHER_KEYS

from xen_vtpm.errors import IntegrityError, UsageError
from xen_vtpm.store.manifest import MAC_SIZE, MAX_METADATA, Manifest, StreamRecord, decode, encode, parse

METADATA = b'{"kind":"snapshot"}\x00\xff opaque'


def sample(n_chunks: int = 3) -> Manifest:
    chunks = tuple((hashlib.sha256(bytes([i])).digest(), 1000 + i) for i in range(n_chunks))
    mem = StreamRecord("memory", "stream", sum(ln for _, ln in chunks), b"\x11" * 32, None, chunks)
    img = StreamRecord("vtpm-image", "blob", 5, b"\x22" * 32, b"\x33" * 32,
                       ((hashlib.sha256(b"img").digest(), 5),))
    return Manifest(checkpoint_id="c0ffee", name="daily", vm_uuid="6e1f-vm", vm_name="guest1",
                    tool_version="0.1.0", created_us=1_764_000_000_000_000, metadata=METADATA, streams=(mem, img))


def _mac(body: bytes) -> bytes:
    return body + hmac.digest(KEYS.manifest_mac, body, "sha256")


def test_round_trip_and_canonical():
    m = sample()
    data = encode(m, KEYS.manifest_mac)
    assert decode(data, KEYS.manifest_mac, "c0ffee") == m
    assert encode(decode(data, KEYS.manifest_mac, "c0ffee"), KEYS.manifest_mac) == data
    assert m.size == m.stream("memory").length + 5
    # The metadata travels as the caller's bytes, at a fixed place: right after the time.
    head = b"XVTPMANI\x03\x00" + b"".join(len(t).to_bytes(2, "little") + t
                                          for t in (b"c0ffee", b"daily", b"6e1f-vm", b"guest1", b"0.1.0"))
    assert data.startswith(head + (1_764_000_000_000_000).to_bytes(8, "little")
                           + len(METADATA).to_bytes(4, "little") + METADATA)


def test_metadata_is_bounded_on_both_sides():
    big = Manifest(**{**sample().__dict__, "metadata": bytes(MAX_METADATA + 1)})
    with pytest.raises(UsageError, match="metadata is too long"):
        encode(big, KEYS.manifest_mac)
    at_bound = Manifest(**{**sample().__dict__, "metadata": bytes(MAX_METADATA)})
    body = encode(at_bound, KEYS.manifest_mac)[:-MAC_SIZE]
    assert parse(body, "c0ffee") == at_bound
    pos = body.index(MAX_METADATA.to_bytes(4, "little"))
    grown = body[:pos] + (MAX_METADATA + 1).to_bytes(4, "little") + body[pos + 4:pos + 4 + MAX_METADATA] + b"\0" \
        + body[pos + 4 + MAX_METADATA:]
    with pytest.raises(IntegrityError, match="metadata length 1048577 exceeds 1048576"):
        parse(grown, "c0ffee")


@pytest.mark.parametrize("version", [1, 2])
def test_pre_release_formats_are_refused_with_a_clear_message(version):
    # A genuinely MAC'd manifest of an older format: the key is right, the layout is not ours.
    body = bytearray(encode(sample(), KEYS.manifest_mac)[:-MAC_SIZE])
    body[8:10] = version.to_bytes(2, "little")
    sealed = _mac(bytes(body))
    with pytest.raises(IntegrityError) as err:
        decode(sealed, KEYS.manifest_mac, "c0ffee")
    assert str(err.value) == (f"checkpoint c0ffee: manifest format version {version} comes from a pre-release "
                              "xen-vtpm and is not read by this release (it reads version 3); delete the "
                              "checkpoint with `xen-vtpm delete` and take a new one")


def test_wrong_key_is_a_mac_failure_naming_the_checkpoint():
    data = encode(sample(), KEYS.manifest_mac)
    with pytest.raises(IntegrityError, match=r"^checkpoint c0ffee: manifest MAC mismatch"):
        decode(data, OTHER_KEYS.manifest_mac, "c0ffee")


def test_every_single_byte_flip_and_truncation_is_rejected():
    data = encode(sample(), KEYS.manifest_mac)
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x40
        with pytest.raises(IntegrityError) as err:
            decode(bytes(bad), KEYS.manifest_mac, "c0ffee")
        assert "\n" not in str(err.value) and "c0ffee" in str(err.value)
    for n in range(len(data)):
        with pytest.raises(IntegrityError):
            decode(data[:n], KEYS.manifest_mac, "c0ffee")


@pytest.mark.parametrize("mutate, what", [
    (lambda b: b[:8] + b"\x02\x00" + b[10:], "format version 2 comes from a pre-release"),
    (lambda b: b[:8] + b"\x04\x00" + b[10:], "unsupported version 4"),
    (lambda b: b"XXXXXXXX" + b[8:], "bad magic"),
    (lambda b: b + b"\x00", "trailing bytes"),
    (lambda b: b.replace(len(METADATA).to_bytes(4, "little") + METADATA,
                         (len(METADATA) + 100_000).to_bytes(4, "little") + METADATA), "runs past the end"),
    (lambda b: b.replace(b"guest1", b"gu\xffst1", 1), "not UTF-8"),
])
def test_structural_errors_are_named(mutate, what):
    body = encode(sample(), KEYS.manifest_mac)[:-MAC_SIZE]
    with pytest.raises(IntegrityError, match=what):
        parse(mutate(body), "c0ffee")


def test_chunk_lengths_must_sum_to_the_stream_length():
    m = sample()
    bad = Manifest(**{**m.__dict__, "streams": (StreamRecord("memory", "stream", 1, b"\x11" * 32, None,
                                                             m.streams[0].chunks),)})
    with pytest.raises(IntegrityError, match="sum to"):
        parse(encode(bad, KEYS.manifest_mac)[:-MAC_SIZE], "c0ffee")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes(data):
    try:
        parse(data, "fuzz")
    except IntegrityError as exc:
        assert "\n" not in str(exc) and "fuzz" in str(exc)


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_fuzz_mutated_valid_manifest(data):
    body = bytearray(encode(sample(), KEYS.manifest_mac)[:-MAC_SIZE])
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, max(0, len(body) - 1)))
        if op == "flip" and body:
            body[pos] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del body[pos:pos + data.draw(st.integers(1, 64))]
        else:
            body[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
    try:
        m = parse(bytes(body), "fuzz")
    except IntegrityError:
        return
    # Anything accepted must be exactly what the encoder would produce (canonical form).
    assert encode(m, KEYS.manifest_mac)[:-MAC_SIZE] == bytes(body)
