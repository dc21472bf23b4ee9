"""`xen-vtpm demo`: the whole product on a throwaway simulated host.

Every action goes through the commands a user would type (`xen-vtpm ...` run
in-process through `cli.main` with the simulated host's config, its `xl`, and
tpm2-tools as the guest's TPM client), so the demo doubles as a smoke test of
the real code paths.  It returns 0 only if every check held, and it always
takes the host down again, also on an error, Ctrl-C or SIGTERM.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from xen_vtpm import cli
from xen_vtpm.config import Config
from xen_vtpm.errors import XenVtpmError

GUEST = "guest1"
MEMORY_MIB = 64
PCR = 16
NV_COUNTER = "0x1500100"   # owner-range NV index for the guest's monotonic counter
HVM_GUEST = "hvm1"         # the second backend: an HVM guest whose QEMU has an swtpm TPM 2.0 in dom0
HVM_MIB = 16
STEPS = 9


class DemoError(XenVtpmError):
    """A command the demo depends on failed; its own exit code is kept."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Demo:
    def __init__(self, sim_dir: Path, json_mode: bool, quiet: bool) -> None:
        self.sim_dir = sim_dir
        self.config = sim_dir / "config.ini"
        self.narrate = not (json_mode or quiet)
        self.checks: list[dict[str, Any]] = []
        self.facts: dict[str, Any] = {"guest": GUEST, "sim_dir": str(sim_dir)}
        self.tcti = ""

    # --- output -----------------------------------------------------------------
    def say(self, text: str) -> None:
        if self.narrate:
            print(text, flush=True)

    def step(self, n: int, text: str) -> None:
        self.say(f"== {n}/{STEPS} {text}")

    def check(self, name: str, ok: bool, detail: str) -> bool:
        self.checks.append({"check": name, "ok": bool(ok), "detail": detail})
        self.say(f"   [{'ok' if ok else 'FAILED'}] {name}: {detail}")
        return ok

    # --- the tool, as a user runs it --------------------------------------------
    def tool(self, *argv: str, expect: int | None = 0, show: bool = True, bars: bool = False) -> tuple[int, str, str]:
        """Run `xen-vtpm ARGV` in-process.  With bars, stderr stays on the terminal for progress bars."""
        if show:
            self.say(f"   $ xen-vtpm {shlex.join(argv)}")
        flags = ["--config", str(self.config)]   # `sim` commands ignore it
        if bars and not self.narrate:
            flags.append("-q")
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), (contextlib.nullcontext() if bars else contextlib.redirect_stderr(err)):
            rc = cli.main([*flags, *argv])
        if rc == 130:
            raise KeyboardInterrupt
        if expect is not None and rc != expect:
            line = (err.getvalue().strip().splitlines() or [f"exit {rc}"])[-1]
            raise DemoError(f"demo: `xen-vtpm {shlex.join(argv)}` exited {rc}: {line}", rc or 1)
        return rc, out.getvalue(), err.getvalue()

    def tool_json(self, *argv: str, show: bool = False) -> Any:
        return json.loads(self.tool("--json", *argv, show=show)[1])

    def sim(self, *argv: str) -> str:
        return self.tool("sim", *argv, "--dir", str(self.sim_dir), show=False)[1].strip()

    def xl(self, *argv: str) -> None:
        """The host's own xl (from the config), as an administrator would run it."""
        self.say(f"   $ xl {shlex.join(argv)}")
        proc = subprocess.run([Config.load(self.config).xl, *argv], capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise DemoError(f"demo: `xl {shlex.join(argv)}` exited {proc.returncode}: {proc.stderr.strip()}", 9)

    # --- the guest's TPM client: tpm2-tools over the vTPM's TCTI ----------------
    def tpm(self, tool: str, *args: str, show: bool = True) -> bytes:
        argv = [tool, "-T", self.tcti, *args]
        if show:
            self.say(f"   $ {shlex.join(argv)}")
        try:
            proc = subprocess.run(argv, capture_output=True, timeout=30)
        except FileNotFoundError:
            raise DemoError(f"demo: {tool} not found; install tpm2-tools (the guest's TPM client)", 8) from None
        if proc.returncode != 0:
            msg = proc.stderr.decode(errors="replace").strip().splitlines() or [""]
            raise DemoError(f"demo: {tool} failed (exit {proc.returncode}): {msg[-1][:200]}", 8)
        return proc.stdout

    def refresh_tcti(self) -> None:
        """The vTPM serves a new TCTI port whenever its stub domain is re-created (e.g. by a rollback)."""
        self.tcti = self.sim("tcti", GUEST)

    def extend_and_increment(self, label: str) -> None:
        digest = hashlib.sha256(label.encode()).hexdigest()
        self.tpm("tpm2_pcrextend", f"{PCR}:sha256={digest}")
        self.tpm("tpm2_nvincrement", "-C", "o", NV_COUNTER)

    def read_state(self, show: bool = True) -> dict[str, Any]:
        out = self.tpm("tpm2_pcrread", f"sha256:{PCR}", show=show)
        pcr = out.decode().strip().rsplit("0x", 1)[-1].lower()
        raw = self.tpm("tpm2_nvread", "-C", "o", "-s", "8", NV_COUNTER, show=show)
        counter = int.from_bytes(raw, "big") if len(raw) == 8 else -1
        return {"pcr16": pcr, "counter": counter}

    def show_state(self, what: str, state: dict[str, Any]) -> None:
        self.say(f"   {what}: PCR {PCR} = {state['pcr16'][:16]}…  NV counter = {state['counter']}")

    # --- the story ---------------------------------------------------------------
    def run(self) -> None:
        self.step(1, "start a throwaway simulated Xen host and provision the tool")
        self.say(f"   $ xen-vtpm sim up --dir {self.sim_dir}")
        self.tool("-q", "sim", "up", "--dir", str(self.sim_dir), show=False)
        self.say(f"   (each `xen-vtpm` command below runs with --config {self.config})")
        self.tool("init")

        self.step(2, f"create {GUEST} ({MEMORY_MIB} MiB) with its vTPM stub domain vtpm-{GUEST}")
        self.tool("sim", "create", GUEST, "--memory", str(MEMORY_MIB), "--dir", str(self.sim_dir))
        self.say(self.tool("list")[1].rstrip())

        self.step(3, f"as the guest: extend PCR {PCR} and increment an NV counter (tpm2-tools)")
        self.refresh_tcti()
        self.tpm("tpm2_nvdefine", "-C", "o", "-s", "8", "-a", "ownerread|ownerwrite|nt=counter", NV_COUNTER)
        self.extend_and_increment("demo: measured at boot")
        at_snapshot = self.read_state()
        self.show_state("now", at_snapshot)

        self.step(4, f"snapshot {GUEST} and its vTPM together")
        self.tool("snapshot", GUEST, "--name", "before-change", bars=True)
        first = self._checkpoint("before-change")
        self.say(f"   checkpoint {first['id']}: {first['size']:,} bytes, {first['stored_bytes']:,} stored")

        self.step(5, "change the vTPM again, then roll back")
        self.extend_and_increment("demo: changed after the snapshot")
        changed = self.read_state()
        self.show_state("changed", changed)
        self.tool("rollback", GUEST, "before-change", "--yes", bars=True)
        self.refresh_tcti()
        after = self.read_state()
        self.show_state("after rollback", after)
        self.check("state changed after the snapshot", changed != at_snapshot,
                   f"PCR {PCR} {changed['pcr16'][:12]}…, counter {changed['counter']}")
        self.check(f"PCR {PCR} back at its snapshot value", after["pcr16"] == at_snapshot["pcr16"],
                   f"{after['pcr16'][:16]}… (snapshot {at_snapshot['pcr16'][:16]}…)")
        self.check("NV counter back at its snapshot value", after["counter"] == at_snapshot["counter"],
                   f"{after['counter']} (snapshot {at_snapshot['counter']}, before rollback {changed['counter']})")

        self.step(6, "take a second checkpoint and corrupt one byte of its pack file")
        packs_dir = Path(self.tool_json("status")["state_dir"]) / "packs"
        before = set(packs_dir.glob("*.pack"))
        self.tool("snapshot", GUEST, "--name", "second", bars=True)
        new_packs = sorted(set(packs_dir.glob("*.pack")) - before, key=lambda p: p.stat().st_size)
        if not new_packs:
            raise DemoError("demo: the second checkpoint wrote no new pack file; nothing to corrupt")
        pack = new_packs[-1]
        offset = _flip_byte(pack)
        self.say(f"   flipped byte {offset} of packs/{pack.name} (inside a sealed chunk)")
        self.facts["corrupted_pack"] = f"packs/{pack.name}"

        self.step(7, "the corrupted checkpoint is refused (exit 5) and nothing changes")
        self.xl("pause", GUEST)   # a running guest keeps writing its memory; hold it still to compare
        state_before = self._observe()
        rc_verify, _, err_verify = self.tool("verify", "second", expect=None)
        self.say(f"   -> exit {rc_verify}: {err_verify.strip()}")
        rc_rb, _, err_rb = self.tool("rollback", GUEST, "second", "--yes", expect=None)
        self.say(f"   -> exit {rc_rb}: {err_rb.strip()}")
        state_after = self._observe()
        self.xl("unpause", GUEST)
        self.check("verify of the corrupted checkpoint refused", rc_verify == 5, f"exit {rc_verify}")
        self.check("rollback to the corrupted checkpoint refused", rc_rb == 5, f"exit {rc_rb}")
        for key, label in (("memdigest", "guest memory (SHA-256)"), ("pcr16", f"PCR {PCR}"),
                           ("counter", "NV counter"), ("domids", "domids of guest and vTPM"),
                           ("checkpoints", "checkpoint list")):
            same = state_before[key] == state_after[key]
            value = state_after[key]
            shown = (f"{value[:16]}…" if key in ("memdigest", "pcr16") else
                     f"{len(value)} checkpoints" if key == "checkpoints" else str(value))
            self.check(f"{label} unchanged", same, shown if same else f"{state_before[key]} -> {value}")
        rc_ok = self.tool("verify", "before-change", expect=None)[0]
        self.check("the untouched checkpoint still verifies", rc_ok == 0, f"exit {rc_ok}")

        self.step(8, f"the second backend: {HVM_GUEST}, an HVM guest whose TPM 2.0 is an swtpm in dom0")
        self.tool("sim", "create", HVM_GUEST, "--vtpm", "swtpm", "--memory", str(HVM_MIB), "--dir", str(self.sim_dir))
        self.say(self.tool("checkpoints")[1].rstrip() or "   (no checkpoints yet)")
        self.tcti = self.sim("tcti", HVM_GUEST)
        self.tpm("tpm2_nvdefine", "-C", "o", "-s", "8", "-a", "ownerread|ownerwrite|nt=counter", NV_COUNTER)
        self.extend_and_increment("demo: hvm1 measured at boot")
        hvm_snapshot = self.read_state()
        self.tool("snapshot", HVM_GUEST, "--name", "hvm-before", bars=True)
        self.extend_and_increment("demo: hvm1 changed after the snapshot")
        hvm_changed = self.read_state()
        self.tool("rollback", HVM_GUEST, "hvm-before", "--yes", bars=True)
        self.tcti = self.sim("tcti", HVM_GUEST)
        hvm_after = self.read_state()
        self.show_state(f"{HVM_GUEST} after rollback", hvm_after)
        self.check(f"{HVM_GUEST}: PCR {PCR} and NV counter back at the snapshot (swtpm backend)",
                   hvm_after == hvm_snapshot and hvm_changed != hvm_snapshot,
                   f"counter {hvm_after['counter']} (snapshot {hvm_snapshot['counter']}, "
                   f"before rollback {hvm_changed['counter']})")
        backends = {r["domain"]: r["backend"] for r in self.tool_json("checkpoints")}
        self.check("checkpoints name each guest's backend", backends == {GUEST: "stubdom", HVM_GUEST: "swtpm"},
                   str(backends))
        self.facts["swtpm"] = {"snapshot": hvm_snapshot, "changed": hvm_changed, "after_rollback": hvm_after}

        self.step(9, "the audit log")
        self.say(self.tool("audit")[1].rstrip())
        rc_audit = self.tool("audit", "--verify", expect=None)[0]
        self.check("audit chain verifies against the TPM counter", rc_audit == 0, f"exit {rc_audit}")
        self.facts["audit"] = self.tool_json("audit")
        self.facts["pcr16"] = {"snapshot": at_snapshot["pcr16"], "changed": changed["pcr16"],
                               "after_rollback": after["pcr16"]}
        self.facts["nv_counter"] = {"snapshot": at_snapshot["counter"], "changed": changed["counter"],
                                    "after_rollback": after["counter"]}
        self.facts["checkpoints"] = self.tool_json("checkpoints", GUEST)

    def _checkpoint(self, name: str) -> dict[str, Any]:
        rows = [r for r in self.tool_json("checkpoints", GUEST) if r["name"] == name]
        if len(rows) != 1:
            raise DemoError(f"demo: checkpoint {name!r} is not listed exactly once by `xen-vtpm checkpoints`")
        return rows[0]

    def _observe(self) -> dict[str, Any]:
        state = self.read_state(show=False)
        doms = {r["name"]: r["domid"] for r in self.tool_json("list") if r.get("name") in (GUEST, f"vtpm-{GUEST}")}
        return {**state, "memdigest": self.sim("memdigest", GUEST), "domids": doms,
                "checkpoints": sorted(r["id"] for r in self.tool_json("checkpoints", GUEST))}


def _flip_byte(pack: Path) -> int:
    """Flip a byte in the first entry's sealed chunk (header 32 + entry header 48; docs/formats.md,
    Checkpoint store §1)."""
    offset = 32 + 48 + 100
    with open(pack, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))
    return offset


def _take_down(sim_dir: Path) -> int:
    """`xen-vtpm sim down`, shielded from a second Ctrl-C or SIGTERM so it always completes."""
    try:
        old = [(sig, signal.signal(sig, signal.SIG_IGN)) for sig in (signal.SIGINT, signal.SIGTERM)]
    except ValueError:  # not the main thread: signals cannot reach us here anyway
        old = []
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return cli.main(["-q", "sim", "down", "--dir", str(sim_dir)])
    finally:
        for sig, handler in old:
            signal.signal(sig, handler)


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM into SystemExit so the host is taken down as on Ctrl-C."""
    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)
    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: nothing to install
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run(json_mode: bool = False, quiet: bool = False) -> int:
    t0 = time.monotonic()
    # The host lives right in the temporary directory: Unix socket paths in it must stay short.
    with tempfile.TemporaryDirectory(prefix="xvtpm-demo-", ignore_cleanup_errors=True) as tmp, _sigterm_as_exit():
        demo = Demo(Path(tmp), json_mode, quiet)
        try:
            demo.run()
        finally:
            down_rc = _take_down(demo.sim_dir)
            with contextlib.suppress(OSError):   # e.g. stdout was a pipe that closed: the host is down anyway
                demo.say("== stopped the simulated host")
        demo.check("simulated host stopped, no process left", down_rc == 0, f"sim down exit {down_rc}")
    failed = [c["check"] for c in demo.checks if not c["ok"]]
    elapsed = time.monotonic() - t0
    if json_mode:
        print(json.dumps({"ok": not failed, "duration_s": round(elapsed, 2), "checks": demo.checks,
                          **demo.facts}, indent=2, sort_keys=True, default=str))
    demo.say(f"== demo {'passed' if not failed else 'FAILED'}: {len(demo.checks) - len(failed)}/"
             f"{len(demo.checks)} checks held in {elapsed:.1f} s")
    if failed:
        print(f"xen-vtpm: demo: {len(failed)} check(s) failed: {'; '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """The `xen-vtpm demo` command (entry point of group ``xen_vtpm.commands``)."""
    sp = sub.add_parser("demo", help="run the demonstration on a throwaway simulated host")
    sp.set_defaults(func=lambda args, cfg: run(json_mode=args.json, quiet=args.quiet), needs_config=False)
