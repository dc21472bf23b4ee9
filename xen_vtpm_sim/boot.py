"""The simulated host's measured boot: what firmware, option ROMs and the boot loader extend into the
physical TPM's PCRs before dom0 runs, so that a vtpmmgr sealed to them sees the same values after
every boot, and different ones after an update.

The administrator's policy authority, the key that approves a changed boot for the manager
(vtpmmgr/tools/tpm2-policy.py), is ``DIR/boot/authority.pem``; `sim up` creates it and provisions
the manager with its public key.

The events live in ``DIR/boot/measurements`` (``PCR<TAB>text`` lines, extended in order with
TPM2_PCR_Event, which extends every allocated bank with the event's digest); ``sim up`` writes the
default list once, ``sim reboot --measure PCR=TEXT`` replaces what one PCR measures (a firmware or
Xen update) and keeps it for the boots after.
"""
from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from tpm2_pytss import ESAPI, TCTILdr
from tpm2_pytss.constants import ESYS_TR

from xen_vtpm.errors import UsageError

NR_PCRS = 24
# PCRs 0-7: the boot chain the manager seals to (`tpm2_pcrs=0-7`).
DEFAULT_EVENTS: list[tuple[int, str]] = [
    (0, "simulated firmware 1.0"),
    (1, "firmware configuration"),
    (2, "option ROMs"),
    (4, "boot loader: grub 2.06"),
    (4, "xen 4.17 hypervisor"),
    (4, "dom0 linux 6.1 kernel and initrd"),
    (5, "partition table"),
    (7, "secure boot: disabled"),
]


def events_path(sim_dir: Path) -> Path:
    return sim_dir / "boot" / "measurements"


def load(sim_dir: Path) -> list[tuple[int, str]]:
    """The host's boot events; the defaults until a boot wrote them."""
    path = events_path(sim_dir)
    if not path.exists():
        return list(DEFAULT_EVENTS)
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        pcr, _, text = line.partition("\t")
        events.append((int(pcr), text))
    return events


def save(sim_dir: Path, events: list[tuple[int, str]]) -> None:
    path = events_path(sim_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{pcr}\t{text}\n" for pcr, text in events), encoding="utf-8")


def parse_change(text: str) -> tuple[int, str]:
    """`PCR=TEXT` of `sim reboot --measure`."""
    pcr, sep, event = text.partition("=")
    if not sep or not pcr.isdigit() or not 0 <= int(pcr) < NR_PCRS or not event or "\n" in event:
        raise UsageError(f"sim reboot --measure {text!r}: expected PCR=TEXT with PCR 0-{NR_PCRS - 1} "
                         "and a one-line TEXT, e.g. --measure '0=simulated firmware 1.1'")
    return int(pcr), event


def apply_changes(events: list[tuple[int, str]], changes: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """What one PCR measures is replaced by the new events for it; the others stay as they were."""
    changed = {pcr for pcr, _ in changes}
    kept = [(pcr, text) for pcr, text in events if pcr not in changed]
    return sorted(kept + changes, key=lambda event: event[0])


def measure(tcti: str, events: list[tuple[int, str]]) -> None:
    """Extend every event into the TPM, as firmware and the boot loader do on a real boot."""
    name, _, conf = tcti.partition(":")
    with ESAPI(TCTILdr(name, conf)) as ectx:
        for pcr, text in events:
            ectx.pcr_event(ESYS_TR.parse(f"pcr{pcr}"), text.encode())


def authority_path(sim_dir: Path) -> Path:
    return sim_dir / "boot" / "authority.pem"


def authority(sim_dir: Path) -> str:
    """x | y of the host's policy authority (ECC NIST P-256) in hex; the key is made once."""
    path = authority_path(sim_dir)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    numbers = key.public_key().public_numbers()
    return (numbers.x.to_bytes(32, "big") + numbers.y.to_bytes(32, "big")).hex()
