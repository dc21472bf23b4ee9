"""This host's identity for moves: two keys that live in its TPM and never leave it.

* the **host key** signs: an ECDSA P-256 restricted signing key, so what it signs over an outside
  digest needs a TPM2_Hash ticket, and its quotes are attestations only the TPM can make;
* the **transfer key** receives: an ECDH P-256 decrypt key; a source seals a move's stream to it
  and only this TPM can compute the shared secret (TPM2_ECDH_ZGen).

Both are primaries of the owner hierarchy made from fixed templates, like the storage primary: the
same keys come back on every run without anything stored, until the owner hierarchy is cleared.
"""
from __future__ import annotations

import hashlib
import socket
from collections.abc import Callable
from typing import TypeVar

from tpm2_pytss import TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPMA_OBJECT
from tpm2_pytss.types import (
    TPM2B_DATA,
    TPM2B_ECC_POINT,
    TPM2B_MAX_BUFFER,
    TPM2B_PUBLIC,
    TPML_PCR_SELECTION,
    TPMS_ECC_POINT,
    TPMT_PUBLIC,
    TPMT_SIG_SCHEME,
)

from xen_vtpm.config import Config
from xen_vtpm.errors import TpmError
from xen_vtpm.transfer.peer import HostKey
from xen_vtpm.transfer.session import Quote

from .session import tpm_session
from .tpm import HostTpm

T = TypeVar("T")
_BASE = (TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
         | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.NODA)
SIGN, TRANSFER = "sign", "transfer"
_TEMPLATES = {
    SIGN: ("ecc256:ecdsa-sha256:null", _BASE | TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT,
           b"xen-vtpm host key v1"),
    TRANSFER: ("ecc256:ecdh-sha256:null", _BASE | TPMA_OBJECT.DECRYPT, b"xen-vtpm transfer key v1"),
}


def _primary(tpm: HostTpm, which: str) -> tuple[ESYS_TR, bytes]:
    spec, attrs, seed = _TEMPLATES[which]
    template = TPM2B_PUBLIC(TPMT_PUBLIC.parse(spec, objectAttributes=attrs))
    template.publicArea.unique.ecc.x = hashlib.sha256(seed).digest()   # the seed input that names this key
    handle, public, *_ = tpm.command("CreatePrimary", tpm.ctx.create_primary, None, template)
    ecc = public.publicArea.unique.ecc
    return handle, bytes(ecc.x) + bytes(ecc.y)


def _flush(tpm: HostTpm, handle: ESYS_TR) -> None:
    tpm.command("FlushContext", tpm.ctx.flush_context, handle)


def _r_s(signature: object) -> bytes:
    ecdsa = signature.signature.ecdsa  # type: ignore[attr-defined]
    return bytes(ecdsa.signatureR).rjust(32, b"\0") + bytes(ecdsa.signatureS).rjust(32, b"\0")


class TpmIdentity:
    """``transfer.session.Identity`` over the host TPM.  ``backend_keys`` gives, per vTPM backend
    kind, the key a moving vTPM's secret is wrapped for (asked each time: a manager restarts)."""

    def __init__(self, cfg: Config, backend_keys: Callable[[], dict[str, bytes]]) -> None:
        self.cfg, self.backend_keys = cfg, backend_keys

    def _tpm(self, what: str, fn: Callable[[HostTpm], T]) -> T:
        try:
            with tpm_session(self.cfg) as tpm:
                return fn(tpm)
        except TSS2_Exception as exc:
            raise TpmError(f"host TPM: {what} failed ({exc}); check the TPM and its owner hierarchy") from None

    def host_key(self) -> HostKey:
        backend_keys = self.backend_keys()     # outside the session: a backend's key may be a TPM key too

        def run(tpm: HostTpm) -> HostKey:
            keys = {}
            for which in (SIGN, TRANSFER):
                handle, keys[which] = _primary(tpm, which)
                _flush(tpm, handle)
            values = tpm.pcr_values()
            return HostKey(host=socket.gethostname(), sign_key=keys[SIGN], transfer_key=keys[TRANSFER],
                           backend_keys=backend_keys, pcrs=tuple(tpm.pcr_list), pcr_values=values)
        return self._tpm("reading the host keys", run)

    def transfer_key(self) -> bytes:
        """The public half of the transfer key (what a source seals to)."""
        def run(tpm: HostTpm) -> bytes:
            handle, key = _primary(tpm, TRANSFER)
            _flush(tpm, handle)
            return key
        return self._tpm("reading the transfer key", run)

    def sign(self, message: bytes) -> bytes:
        """ECDSA-SHA256 over ``message`` (at most 1024 bytes) with the restricted host key."""
        def run(tpm: HostTpm) -> bytes:
            handle, _ = _primary(tpm, SIGN)
            try:
                # A restricted key signs an outside digest only with the TPM's ticket saying the
                # digest is not of a TPM-generated structure (so no forged quote can be signed).
                digest, ticket = tpm.command("Hash", tpm.ctx.hash, TPM2B_MAX_BUFFER(message), TPM2_ALG.SHA256,
                                             ESYS_TR.OWNER)
                return _r_s(tpm.command("Sign", tpm.ctx.sign, handle, digest,
                                        TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL), ticket))
            finally:
                _flush(tpm, handle)
        return self._tpm("signing with the host key", run)

    def quote(self, qualifying: bytes) -> Quote:
        def run(tpm: HostTpm) -> Quote:
            handle, _ = _primary(tpm, SIGN)
            try:
                attest, signature = tpm.command("Quote", tpm.ctx.quote, handle,
                                                TPML_PCR_SELECTION.parse(tpm.pcr_spec), TPM2B_DATA(qualifying),
                                                TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL))
            finally:
                _flush(tpm, handle)
            return Quote(bytes(attest), _r_s(signature), tuple(tpm.pcr_list), tpm.pcr_values())
        return self._tpm("quoting the PCRs", run)

    def zgen(self, point: bytes) -> bytes:
        """The ECDH secret (x coordinate) of ``point`` and the transfer key, computed in the TPM."""
        def run(tpm: HostTpm) -> bytes:
            handle, _ = _primary(tpm, TRANSFER)
            try:
                z = tpm.command("ECDH_ZGen", tpm.ctx.ecdh_zgen, handle,
                                TPM2B_ECC_POINT(TPMS_ECC_POINT(x=point[:32], y=point[32:])))
            finally:
                _flush(tpm, handle)
            return bytes(z.point.x).rjust(32, b"\0")
        return self._tpm("ECDH with the transfer key", run)
