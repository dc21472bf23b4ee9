"""The demo test's probe, run by the test hook at chosen steps of `xen-vtpm demo` (tests/test_demo.py):

    python tests/demo_probe.py TMPDIR WHAT GUEST PCR NV_INDEX

reads GUEST's vTPM (the PCR and the NV counter, with tpm2-tools) and/or its memory file (SHA-256)
on the demo's host under TMPDIR (WHAT: tpm, memory or both), and prints the reading as JSON on
stderr, where the hook logs it.  Kept apart from the test module, and importing nothing heavy, so
each probe starts in a fraction of a second.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from xen_vtpm_sim import domains


def probe(tmp: Path, what: str, guest: str, pcr: str, nv_index: str) -> dict:
    (sim_dir,) = tmp.glob("xvtpm-demo-*")
    out: dict = {}
    if "tpm" in what:
        tcti = (sim_dir / "run" / f"vtpm-{guest}.tcti").read_text().strip()
        value = subprocess.run(["tpm2_pcrread", "-T", tcti, f"sha256:{pcr}"], capture_output=True, text=True,
                               check=True, timeout=30).stdout
        out["pcr"] = value.strip().rsplit("0x", 1)[-1].lower()
        nv = subprocess.run(["tpm2_nvread", "-T", tcti, "-C", "o", "-s", "8", nv_index], capture_output=True,
                            check=True, timeout=30).stdout
        out["nv"] = int.from_bytes(nv, "big")
    if "memory" in what:
        dom = domains.find(domains.snapshot(sim_dir), guest)
        out["memory"] = hashlib.sha256(Path(dom["memfile"]).read_bytes()).hexdigest()
    return out


if __name__ == "__main__":
    print(json.dumps(probe(Path(sys.argv[1]), *sys.argv[2:6]), sort_keys=True), file=sys.stderr)
