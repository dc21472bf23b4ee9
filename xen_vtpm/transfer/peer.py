"""A host's public identity (what `xen-vtpm host-key` prints) and a trusted peer (what `trust add` keeps)."""
from __future__ import annotations

import dataclasses
import re
from typing import Any

from xen_vtpm.errors import UsageError, XenVtpmError

from . import crypto

FORMAT = "xen-vtpm host-key v1"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclasses.dataclass(frozen=True)
class HostKey:
    """The public halves of a host's TPM-resident keys, and its boot PCRs when it was exported.

    ``backend_keys`` holds, per vTPM backend kind, the key a vTPM's secret is wrapped for on its way
    to this host (the stub domain backend: the manager's transfer key, inside the manager's TPM)."""
    host: str
    sign_key: bytes
    transfer_key: bytes
    backend_keys: dict[str, bytes]
    pcrs: tuple[int, ...]
    pcr_values: dict[int, bytes]

    @property
    def fingerprint(self) -> str:
        return crypto.fingerprint(self.sign_key)

    def to_doc(self) -> dict[str, Any]:
        return {"format": FORMAT, "host": self.host, "fingerprint": self.fingerprint,
                "sign_key": self.sign_key.hex(), "transfer_key": self.transfer_key.hex(),
                "backend_keys": {k: v.hex() for k, v in sorted(self.backend_keys.items())},
                "pcrs": list(self.pcrs), "pcr_values": {str(p): v.hex() for p, v in sorted(self.pcr_values.items())}}

    @classmethod
    def from_doc(cls, doc: Any, what: str) -> HostKey:
        """Parse what ``to_doc`` wrote; UsageError naming ``what`` for anything else."""
        try:
            if not isinstance(doc, dict) or doc.get("format") != FORMAT:
                raise ValueError(f"not a {FORMAT!r} document")
            pcrs = tuple(int(p) for p in doc["pcrs"])
            values = {int(p): bytes.fromhex(v) for p, v in doc["pcr_values"].items()}
            if set(values) != set(pcrs) or any(len(v) != 32 for v in values.values()):
                raise ValueError("PCR values do not match the PCR list")
            key = cls(host=str(doc["host"]), sign_key=crypto.point(doc["sign_key"], "sign_key"),
                      transfer_key=crypto.point(doc["transfer_key"], "transfer_key"),
                      backend_keys={str(k): crypto.point(v, f"backend key {k}")
                                    for k, v in doc["backend_keys"].items()},
                      pcrs=pcrs, pcr_values=values)
            if doc.get("fingerprint") not in (None, key.fingerprint):
                raise ValueError("its fingerprint does not match its key (edited)")
        except (KeyError, TypeError, ValueError, AttributeError, XenVtpmError) as exc:
            raise UsageError(f"{what}: not a host key from `xen-vtpm host-key` ({exc}); "
                             "export it again on the other host") from None
        return key


@dataclasses.dataclass(frozen=True)
class TrustedPeer:
    name: str
    key: HostKey
    bind_pcrs: bool           # a move to it needs a quote of these PCR values
    added: str                # UTC, ISO 8601


def check_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise UsageError(f"trust: {name!r} is not a valid peer name; use letters, digits, '.', '_' and '-' "
                         "(at most 64)")
    return name
