"""The cryptography of a move that needs no TPM: verifying the other host, keying the channel.

Keys are NIST P-256 points written as ``x ‖ y`` (64 bytes, hex on the wire).  A host signs with a
restricted ECDSA key of its TPM; it receives with an ECDH key of its TPM (``host/identity.py``).
The source makes a fresh ephemeral key per move in software: the channel key comes from ECDH
with the destination's TPM-resident key, so only that TPM can open the stream (docs/migration.md).
"""
from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Mapping

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from tpm2_pytss.constants import TPM2_ALG, TPM2_ST
from tpm2_pytss.types import TPML_PCR_SELECTION, TPMS_ATTEST

from xen_vtpm.errors import TransferError

POINT = 64
TPM_GENERATED = 0xFF544347          # TPM_GENERATED_VALUE: the TPM made this attestation (TPM 2.0 Part 2 §6.2)

# Every signed or derived value names its purpose, so nothing signed for one use passes for another.
HELLO = b"xen-vtpm move hello v1\0"
KEY = b"xen-vtpm move key v1\0"
OUTCOME = b"xen-vtpm move outcome v1\0"
CHANNEL = b"xen-vtpm move channel v1\0"
ENVELOPE = b"xen-vtpm move envelope v1\0"


def fingerprint(sign_key: bytes) -> str:
    """What an administrator compares between `host-key` and `trust list`."""
    return hashlib.sha256(b"xen-vtpm host key\0" + sign_key).hexdigest()[:32]


def point(text: str, what: str) -> bytes:
    """A key from its hex form; TransferError if it is not a point on P-256."""
    try:
        raw = bytes.fromhex(text)
        if len(raw) != POINT:
            raise ValueError
        public_key(raw)
    except (ValueError, TypeError):
        raise TransferError(f"{what}: not a P-256 public key (expected {2 * POINT} hex digits of x ‖ y)") from None
    return raw


def public_key(raw: bytes) -> ec.EllipticCurvePublicKey:
    return ec.EllipticCurvePublicNumbers(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"),
                                         ec.SECP256R1()).public_key()


def encode_point(key: ec.EllipticCurvePublicKey) -> bytes:
    nums = key.public_numbers()
    return nums.x.to_bytes(32, "big") + nums.y.to_bytes(32, "big")


def verify_signature(sign_key: bytes, message: bytes, signature: bytes) -> bool:
    """ECDSA-SHA256, signature r ‖ s (32 bytes each), as the TPM signs."""
    if len(signature) != 64:
        return False
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    try:
        public_key(sign_key).verify(der, message, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    return True


def digest(*parts: bytes) -> bytes:
    """SHA-256 over length-prefixed parts: no two different part lists give the same input."""
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(4, "big") + part)
    return h.digest()


def pcr_digest(pcr_list: list[int], values: Mapping[int, bytes]) -> bytes:
    """What a TPM2_Quote's pcrDigest holds: SHA-256 of the selected values in PCR order."""
    return hashlib.sha256(b"".join(values[p] for p in sorted(pcr_list))).digest()


def _selected(selection: TPML_PCR_SELECTION) -> list[int] | None:
    """The PCRs of a quote's selection, if it selects in the SHA-256 bank only."""
    out: list[int] = []
    for bank in selection:
        if bank.hash != TPM2_ALG.SHA256:
            return None
        bits = bytes(bank.pcrSelect)[:bank.sizeofSelect]
        out += [i for i in range(8 * len(bits)) if bits[i // 8] >> (i % 8) & 1]
    return sorted(out)


def verify_quote(sign_key: bytes, attest: bytes, signature: bytes, qualifying: bytes, pcr_list: list[int],
                 values: Mapping[int, bytes], who: str) -> None:
    """A TPM2_Quote by ``sign_key`` over ``qualifying`` of exactly the PCRs ``pcr_list``, whose digest
    matches ``values``."""
    if not verify_signature(sign_key, attest, signature):
        raise TransferError(f"{who}: its quote is not signed by its trusted host key; refusing it")
    try:
        body, used = TPMS_ATTEST.unmarshal(attest)
    except Exception:  # noqa: BLE001 - any unmarshalling failure means a malformed quote
        raise TransferError(f"{who}: its quote is malformed; refusing it") from None
    if used != len(attest) or body.magic != TPM_GENERATED or body.type != TPM2_ST.ATTEST_QUOTE:
        raise TransferError(f"{who}: its quote is not a TPM-generated quote; refusing it")
    if not hmac.compare_digest(bytes(body.extraData), qualifying):
        raise TransferError(f"{who}: its quote is for another session (stale or replayed); refusing it")
    if _selected(body.attested.quote.pcrSelect) != sorted(pcr_list):
        raise TransferError(f"{who}: its quote covers other PCRs than the ones it reported; refusing it")
    if bytes(body.attested.quote.pcrDigest) != pcr_digest(pcr_list, values):
        raise TransferError(f"{who}: its quote does not match the PCR values it reported; refusing it")


def ephemeral(peer_transfer_key: bytes) -> tuple[bytes, bytes]:
    """A fresh key pair against the peer's ECDH key: (our public point, shared x coordinate)."""
    own = ec.generate_private_key(ec.SECP256R1())
    return encode_point(own.public_key()), own.exchange(ec.ECDH(), public_key(peer_transfer_key))


def channel_key(z: bytes, nonce_s: bytes, nonce_d: bytes, transfer: str, ephemeral_key: bytes) -> bytes:
    """The stream's AES-256-GCM key (HKDF-SHA256 over the ECDH secret and both nonces)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=nonce_s + nonce_d,
                info=CHANNEL + transfer.encode() + ephemeral_key).derive(z)


def _envelope_key(z: bytes, ephemeral_key: bytes, context: bytes) -> AESGCM:
    return AESGCM(HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                       info=ENVELOPE + digest(context, ephemeral_key)).derive(z))


def seal_envelope(recipient: bytes, context: bytes, secret: bytes) -> bytes:
    """``secret`` for the holder of ``recipient``'s private key (a TPM-resident ECDH key), bound
    to ``context`` (what it is for: transfer, vTPM, checkpoint): ephemeral point ‖ AES-GCM box."""
    eph, z = ephemeral(recipient)
    return eph + _envelope_key(z, eph, context).encrypt(bytes(12), secret, context)


def open_envelope(zgen: Callable[[bytes], bytes], context: bytes, envelope: bytes, what: str) -> bytes:
    """The secret of ``seal_envelope``; ``zgen`` is the recipient's ECDH (its TPM's ECDH_ZGen)."""
    if len(envelope) < POINT + 16:
        raise TransferError(f"{what}: its envelope is truncated (altered)")
    eph = point(envelope[:POINT].hex(), what)
    try:
        return _envelope_key(zgen(eph), eph, context).decrypt(bytes(12), envelope[POINT:], context)
    except InvalidTag:
        raise TransferError(f"{what}: its envelope does not open with this host's transfer key (made for another "
                            "host or move, or altered); nothing was changed") from None
