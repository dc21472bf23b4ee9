"""The vtpmblk slot format (docs/xen-internals.md §5), byte by byte."""
from __future__ import annotations

import hashlib
import struct

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from xen_vtpm.vtpm import vtpmblk
from xen_vtpm_sim import vtpmblk as simblk

SIZE = 2 << 20


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "vtpm.img"
    with open(path, "wb") as fh:
        fh.truncate(SIZE)
    return path


def test_slot_layout_is_length_iv_and_aes_cbc(image):
    plain = b"TPM state " * 100 + b"tail"
    hashkey = simblk.write_slot(image, 1, plain)
    raw = image.read_bytes()
    assert raw[:SIZE // 2] == bytes(SIZE // 2)                 # slot 0 untouched
    (length,) = struct.unpack(">I", raw[SIZE // 2:SIZE // 2 + 4])
    blob = raw[SIZE // 2 + 4:SIZE // 2 + 4 + length]
    iv, ct = blob[:16], blob[16:]
    assert struct.unpack(">I", iv[12:])[0] == len(plain)       # IV = 12 random bytes ‖ be32 plaintext_len
    assert len(ct) % 16 == 0 and len(ct) == len(plain) + (-len(plain) % 16)
    digest, key = hashkey[:20], hashkey[20:]
    assert len(hashkey) == 52 and digest == hashlib.sha1(blob).digest()   # H excludes the length prefix
    dec = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    padded = dec.update(ct) + dec.finalize()
    assert padded[:len(plain)] == plain and not any(padded[len(plain):])  # zero padding, not PKCS#7


def test_fresh_key_per_write_and_load_picks_the_matching_slot(image):
    hk0 = simblk.write_slot(image, 0, b"old state")
    hk1 = simblk.write_slot(image, 1, b"new state")
    assert hk0[20:] != hk1[20:]
    assert simblk.load(image, hk0) == (0, b"old state")
    assert simblk.load(image, hk1) == (1, b"new state")
    hk1b = simblk.write_slot(image, 1, b"new state")          # same plaintext, new key and IV
    assert hk1b != hk1
    with pytest.raises(simblk.ChecksumError):
        simblk.load(image, hk1)                                # the manager's old H no longer matches


def test_mismatch_and_garbage_are_checksum_errors(image):
    simblk.write_slot(image, 0, b"x" * 33)
    with pytest.raises(simblk.ChecksumError):
        simblk.load(image, bytes(52))
    with pytest.raises(simblk.ChecksumError):
        simblk.load(image, b"short")
    with open(image, "r+b") as fh:                              # a length prefix past the slot
        fh.write(struct.pack(">I", SIZE))
    assert simblk.read_slot(image, 0) is None


def test_tool_fingerprints_match_the_format(image):
    assert vtpmblk.slot_fingerprints(image) == (None, None)
    hk = simblk.write_slot(image, 0, b"a")
    assert vtpmblk.slot_fingerprints(image) == (hk[:20].hex(), None)
    hk1 = simblk.write_slot(image, 1, b"b")
    fps = vtpmblk.slot_fingerprints(image)
    assert fps == tuple(d.hex() for d in simblk.fingerprints(image)) == (hk[:20].hex(), hk1[:20].hex())
    assert vtpmblk.matching_slot(image, hk1[:20].hex()) == 1
    assert vtpmblk.matching_slot(image, "00" * 20) is None


def test_state_too_big_for_a_slot_is_refused(tmp_path):
    small = tmp_path / "small.img"
    small.write_bytes(bytes(4096))
    with pytest.raises(OSError, match="does not fit"):
        simblk.write_slot(small, 0, bytes(4096))


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=3000))
def test_roundtrip_any_plaintext(plain):
    key = bytes(range(32))
    assert simblk.decrypt(simblk.encrypt(plain, key), key) == plain
