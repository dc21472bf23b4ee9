#!/usr/bin/env python3
"""The policy authority of a vtpmmgr on a TPM 2.0 host (patch 0002, docs/vtpmmgr-tpm2.md).

The authority is an ECC NIST P-256 key kept off the host.  The manager records its public key when
it provisions group 0 (tpm2_authority=), and opens its table on a boot whose PCRs changed only if
the authority signed that boot's PolicyPCR digest (tpm2_authorized=).

  tpm2-policy.py keygen KEY.pem                write a new authority key (mode 0600)
  tpm2-policy.py authority KEY.pem             print the tpm2_authority= word for provisioning
  tpm2-policy.py approve KEY.pem DIGEST        print the tpm2_authorized= word approving DIGEST, the
                                               PolicyPCR digest the manager printed for the new boot
  tpm2-policy.py policy PCRS VALUE...          the PolicyPCR digest of sha256 PCR values, to approve
                                               a boot before it happens (PCRS like 0-7, one hex
                                               VALUE per selected PCR, lowest first)

Needs the `cryptography` package only, so it runs on an offline machine.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import struct
import sys

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

# tpm2_seal.h TPM2_SEAL_POLICY_REF: what TPM2_PolicyAuthorize is given as policyRef.
POLICY_REF = b"xen-vtpmmgr"
TPM_CC_POLICY_PCR = 0x17F
TPM_ALG_SHA256 = 0x000B


class PolicyError(Exception):
    """Bad input: one line for the user."""


def _load(path: str) -> ec.EllipticCurvePrivateKey:
    try:
        with open(path, "rb") as fh:
            key = serialization.load_pem_private_key(fh.read(), password=None)
    except (OSError, ValueError) as exc:
        raise PolicyError(f"{path}: cannot read the authority key ({exc}); create one with `keygen`") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise PolicyError(f"{path}: not an ECC NIST P-256 private key; create one with `keygen`")
    return key


def _public_xy(key: ec.EllipticCurvePrivateKey) -> bytes:
    numbers = key.public_key().public_numbers()
    return numbers.x.to_bytes(32, "big") + numbers.y.to_bytes(32, "big")


def _hex(text: str, size: int, what: str) -> bytes:
    try:
        value = bytes.fromhex(text)
    except ValueError:
        value = b""
    if len(value) != size:
        raise PolicyError(f"{what} {text[:80]!r}: expected {2 * size} hex digits")
    return value


def _pcr_mask(text: str) -> int:
    mask = 0
    for part in text.split(","):
        low, _, high = part.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise PolicyError(f"PCRS {text!r}: expected numbers and ranges like 0-7 or 0,2,4-7")
        first, last = int(low), int(high or low)
        if not 0 <= first <= last <= 23:
            raise PolicyError(f"PCRS {text!r}: PCRs are 0 to 23")
        for pcr in range(first, last + 1):
            mask |= 1 << pcr
    return mask


def policy_pcr_digest(mask: int, values: list[bytes]) -> bytes:
    """TPM2_PolicyPCR from an empty policy: H(0^32 || CC || TPML_PCR_SELECTION || H(values))."""
    selection = struct.pack(">IHB", 1, TPM_ALG_SHA256, 3) + mask.to_bytes(3, "little")
    pcr_digest = hashlib.sha256(b"".join(values)).digest()
    return hashlib.sha256(bytes(32) + struct.pack(">I", TPM_CC_POLICY_PCR) + selection + pcr_digest).digest()


def approve(key: ec.EllipticCurvePrivateKey, policy: bytes) -> bytes:
    """x | y | r | s: the TPM checks ECDSA-SHA256 over approvedPolicy || policyRef (PolicyAuthorize's aHash)."""
    r, s = decode_dss_signature(key.sign(policy + POLICY_REF, ec.ECDSA(hashes.SHA256())))
    return _public_xy(key) + r.to_bytes(32, "big") + s.to_bytes(32, "big")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tpm2-policy.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("keygen").add_argument("key")
    sub.add_parser("authority").add_argument("key")
    p = sub.add_parser("approve")
    p.add_argument("key")
    p.add_argument("digest")
    p = sub.add_parser("policy")
    p.add_argument("pcrs")
    p.add_argument("values", nargs="+")
    args = ap.parse_args(argv)
    try:
        if args.command == "keygen":
            pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
            try:
                fd = os.open(args.key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except OSError as exc:
                raise PolicyError(f"{args.key}: cannot create ({exc.strerror}); pick a new file name") from None
            with os.fdopen(fd, "wb") as fh:
                fh.write(pem)
            print(f"tpm2_authority={_public_xy(_load(args.key)).hex()}")
        elif args.command == "authority":
            print(f"tpm2_authority={_public_xy(_load(args.key)).hex()}")
        elif args.command == "approve":
            print(f"tpm2_authorized={approve(_load(args.key), _hex(args.digest, 32, 'DIGEST')).hex()}")
        else:
            mask = _pcr_mask(args.pcrs)
            if len(args.values) != bin(mask).count("1"):
                raise PolicyError(f"PCRS {args.pcrs} selects {bin(mask).count('1')} PCRs but "
                                  f"{len(args.values)} values were given")
            print(policy_pcr_digest(mask, [_hex(v, 32, "VALUE") for v in args.values]).hex())
    except PolicyError as exc:
        print(f"tpm2-policy.py: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
