"""Host-TPM costs on swtpm: per-operation latency, and TPM commands per snapshot / rollback.

Starts its own swtpm in a temporary dir (stopped on exit), provisions a
throwaway state dir, then
  1. times unseal (load + policy session + unseal + flushes), NV counter
     increment, NV counter read and PCR read over N runs (median, p90);
  2. counts the TPM commands the coordinator's sequence actually issues, by
     running it: open_host (one unseal per command) + freshness check + audit
     append + advance (one increment per state change); a rollback adds the
     rollback authorization and, by default, a safety checkpoint (a second
     state change).

    python bench/tpm_ops.py [-n RUNS]
"""
from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from tpm2_pytss.constants import ESYS_TR  # noqa: E402
from tpm_fixture import Swtpm, make_cfg  # noqa: E402

from xen_vtpm.host import provision, session  # noqa: E402
from xen_vtpm.host import tpm as hosttpm
from xen_vtpm.host.tpm import HostTpm, SealedBlob  # noqa: E402


def _timed(fn, runs: int) -> tuple[float, float]:
    samples = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1000)
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(0.9 * len(samples)))]


def _command(cfg, body) -> tuple[collections.Counter, float]:
    """Run one CLI command's host-TPM work from a cold process state; (TPM commands, wall ms)."""
    session.close_all()
    before = collections.Counter(hosttpm.OPS)
    t = time.perf_counter()
    host = session.open_host(cfg)
    body(host)
    ms = (time.perf_counter() - t) * 1000
    ops = collections.Counter(hosttpm.OPS) - before
    session.close_all()
    return ops, ms


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--runs", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="xen-vtpm-bench-") as tmp:
        tmp_path = Path(tmp)
        tpm_proc = Swtpm(tmp_path / "swtpm")
        try:
            cfg = make_cfg(tmp_path, tpm_proc.tcti)
            secret = tmp_path / "secret"
            secret.write_bytes(b"bench secret")
            provision.init(cfg, rollback_auth_file=str(secret))
            session.close_all()

            with HostTpm(cfg.tcti, cfg.pcrs) as tpm:
                blob = SealedBlob.load(cfg.state_dir / session.HOSTKEY)
                scratch = cfg.counter_index + 1  # time increments on a spare counter: the real one is bound
                tpm.counter_define(scratch)
                rows = [
                    ("unseal host key (load+policy+unseal)", *_timed(lambda: tpm.unseal(blob, "host key"), args.runs)),
                    # The raw command: counter_increment() also reads the value back.
                    ("NV counter increment", *_timed(lambda: tpm.ctx.nv_increment(
                        tpm._counter_handle(scratch), auth_handle=ESYS_TR.RH_OWNER), args.runs)),
                    ("NV counter read", *_timed(lambda: tpm.counter_read(scratch), args.runs)),
                    ("PCR read (4 PCRs)", *_timed(tpm.pcr_values, args.runs)),
                ]
            print(f"swtpm latency over {args.runs} runs (ms)")
            print(f"{'operation':40} {'median':>8} {'p90':>8}")
            for name, med, p90 in rows:
                print(f"{name:40} {med:8.3f} {p90:8.3f}")

            def snapshot(host):
                host.check_fresh()
                host.audit("snapshot", vm="bench", checkpoint="c1")
                host.advance()

            def rollback(host):
                host.check_fresh()
                host.authorize_rollback(b"bench secret")
                host.audit("snapshot", vm="bench", checkpoint="pre-rollback")
                host.advance()  # automatic pre-rollback checkpoint
                host.audit("rollback", vm="bench", checkpoint="c1")
                host.advance()

            print("\nTPM commands per CLI command (counted while running the sequence)")
            for name, body in (("snapshot", snapshot), ("rollback (with safety checkpoint)", rollback)):
                ops, ms = _command(cfg, body)
                detail = ", ".join(f"{k} {v}" for k, v in sorted(ops.items()))
                print(f"{name:34} total {sum(ops.values()):3}  unseal {ops['Unseal']}  "
                      f"NV writes {ops['NV_Increment']}  {ms:6.1f} ms  [{detail}]")
            session.close_all()
        finally:
            session.close_all()
            tpm_proc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
