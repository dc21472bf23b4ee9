"""Issue 18 item 2: a guest controls nothing the tool decides with, through its own XenStore nodes.

A hostile guest is connected to the simulated xenstored *as its own domain* (the domain socket
`<sock>.d<domid>`, where xenstored enforces per-domain permissions), and writes, removes and resizes
nodes in its own subtree — the frontend directory `device/vtpm` above all, which libxl makes
guest-writable (docs/xen-internals.md §8.2).  First the three attacks of the issue one by one, then a
seeded random campaign while snapshot, rollback, save, restore and list run on it and on an honest
guest.  Nothing may fail, hang, act on the wrong vTPM or be blocked: every command exits 0, and
every VM/vTPM pair (memory marker + PCR 16, crash_helpers) is exactly the one the command promises.
"""
from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import crash_helpers as ch
import pytest
from e2e_helpers import GUEST, E2EHost, e2e_host

from xen_vtpm.errors import XenStoreError
from xen_vtpm.xen.xenstore import XenStore

HOSTILE = "hostile"


@pytest.fixture(scope="module")
def host(tmp_path_factory) -> Iterator[E2EHost]:
    with e2e_host(tmp_path_factory.mktemp("xs-sec")) as h:
        h.tool("sim", "create", HOSTILE, "--memory", "16")
        yield h


def _sock(h: E2EHost) -> str:
    return str(h.dir / "xenstored.sock")


def domid(h: E2EHost, name: str) -> int | None:
    with XenStore(_sock(h)) as xs:
        for d in xs.ls("/local/domain"):
            if xs.read_or(f"/local/domain/{d}/name") == name:
                return int(d)
    return None


def as_guest(h: E2EHost, name: str = HOSTILE) -> XenStore:
    d = domid(h, name)
    assert d is not None, f"{name} is not running"
    return XenStore(f"{_sock(h)}.d{d}")


def backend_path(h: E2EHost, name: str) -> str:
    with XenStore(_sock(h)) as xs:
        return xs.read(f"/libxl/{domid(h, name)}/device/vtpm/0/backend")


def listed(h: E2EHost) -> dict[str, dict]:
    return {row["name"]: row for row in h.tool_json("list")}


# mini-os tpmback removes a link's backend directory once its frontend's state node is gone (free_tpmif,
# docs/xen-internals.md §9.2): a guest can close its own link, and `list` must say so, not call it verified.
CLOSED_BY_GUEST = "backend gone: the guest's frontend closed the link; restart the guest to reattach"


def own_link(h: E2EHost, name: str) -> tuple[int, str, str, str]:
    """The guest's vTPM link as dom0 reads it: devid 0 on its vTPM stub domain's backend, and the
    UUID libxl recorded for it (a node only the toolstack writes)."""
    guest, stub = domid(h, name), domid(h, f"vtpm-{name}")
    with XenStore(_sock(h)) as xs:
        uuid = xs.read(f"/libxl/{guest}/device/vtpm/0/uuid")
    return 0, f"vtpm-{name}", f"/local/domain/{stub}/backend/vtpm/{guest}/0", uuid


def assert_listed_correctly(h: E2EHost) -> None:
    """`list` works and shows each guest with exactly its own vTPM: the honest one verified, the hostile
    one verified or, if it removed its own frontend state, shown as closed by itself."""
    rows = listed(h)
    for name in (GUEST, HOSTILE):
        links = rows[name]["vtpms"]
        shown = [(v["devid"], v["backend_name"], v["backend_path"], v["uuid"], v["uuid_check"]) for v in links]
        own = own_link(h, name)
        allowed = [[(*own, "ok")]] + ([[(*own, CLOSED_BY_GUEST)]] if name == HOSTILE else [])
        assert shown in allowed, f"{name}: listed as {links}"


def pair(h: E2EHost, name: str) -> ch.Pair:
    return ch.read_pair(h.sim, name)


# --- the issue's three attacks ---------------------------------------------------------------

def _long_names(xs: XenStore, base: str, h: E2EHost) -> None:
    for i in range(40):
        xs.write(f"{base}/{'x' * 110}{i:010d}", "1")


def _second_backend(xs: XenStore, base: str, h: E2EHost) -> None:
    xs.write(f"{base}/1/backend", backend_path(h, GUEST))       # the honest guest's vTPM


def _device_removed(xs: XenStore, base: str, h: E2EHost) -> None:
    xs.rm(f"{base}/0")


ATTACKS: dict[str, Callable[[XenStore, str, E2EHost], None]] = {
    "40 entries with 120-char names": _long_names,
    "a second device pointing at another guest's vTPM": _second_backend,
    "its device directory removed": _device_removed,
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_issue_attack_blocks_nothing(host, attack):
    h = host
    honest = ch.new_state(h.sim, GUEST)
    with as_guest(h) as xs:
        ATTACKS[attack](xs, f"/local/domain/{domid(h, HOSTILE)}/device/vtpm", h)
    assert_listed_correctly(h)
    taken = ch.new_state(h.sim, HOSTILE)
    name = f"atk-{list(ATTACKS).index(attack)}"
    h.snapshot(name, HOSTILE)
    ch.new_state(h.sim, HOSTILE)
    h.tool("rollback", HOSTILE, name, "--yes", "--no-safety-checkpoint")
    assert pair(h, HOSTILE) == taken, "the hostile guest was not rolled back to its checkpoint"
    assert pair(h, GUEST) == honest, "the honest guest's VM/vTPM pair changed"
    assert_listed_correctly(h)
    h.tool("delete", name)


def test_a_guest_that_closes_its_own_link_is_listed_so_and_still_snapshots(host):
    """Removing its frontend state makes tpmback drop the link's backend directory (Xen's behaviour):
    `list` names that, the honest guest stays verified, and a snapshot and rollback of the guest work
    from libxl's trusted record; the rollback's new domain has a verified link again."""
    h = host
    taken = ch.new_state(h.sim, HOSTILE)
    backend = backend_path(h, HOSTILE)
    with as_guest(h) as xs:
        xs.rm(f"/local/domain/{domid(h, HOSTILE)}/device/vtpm/0/state")
    with XenStore(_sock(h)) as xs:
        assert xs.wait_for(lambda: xs.read_or(backend) is None, [backend], 10), "tpmback kept the backend"
    rows = listed(h)
    assert [v["uuid_check"] for v in rows[HOSTILE]["vtpms"]] == [CLOSED_BY_GUEST]
    assert_listed_correctly(h)
    h.snapshot("closed", HOSTILE)
    ch.new_state(h.sim, HOSTILE)
    h.tool("rollback", HOSTILE, "closed", "--yes", "--no-safety-checkpoint")
    assert pair(h, HOSTILE) == taken
    assert [v["uuid_check"] for v in listed(h)[HOSTILE]["vtpms"]] == ["ok"]
    h.tool("delete", "closed")


# --- the random campaign -----------------------------------------------------------------------

_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_@"
_KEYS = ("state", "backend", "backend-id", "handle", "uuid", "ring-ref", "event-channel", "feature-protocol-v2")


class HostileGuest(threading.Thread):
    """Writes, removes and resizes nodes under its own /local/domain/<id>/{device,data} while it
    runs; follows the guest to its new domain id after a rollback or restore (once the restored
    guest's frontend connected: a kernel attacks after it booted)."""

    def __init__(self, h: E2EHost, seed: int) -> None:
        super().__init__(daemon=True)
        self.h, self.rng, self.seed = h, random.Random(seed), seed
        self.stop = threading.Event()
        self.ops: Counter[str] = Counter()
        self.error: BaseException | None = None

    def _value(self) -> str:
        size = self.rng.choice((0, 1, 8, 120, 1000, 2000))
        kind = self.rng.random()
        if kind < 0.2:
            return backend_path(self.h, GUEST)
        if kind < 0.4:      # bytes that are not UTF-8, escapes, newlines
            raw = bytes(self.rng.randrange(256) for _ in range(size))
            return raw.decode("utf-8", "surrogateescape")
        return "".join(self.rng.choice(_ALPHABET + " \n\x1b") for _ in range(size))

    def _node(self) -> str:
        return "".join(self.rng.choice(_ALPHABET) for _ in range(self.rng.choice((1, 3, 40, 120))))

    def _one(self, xs: XenStore, d: int) -> None:
        base = f"/local/domain/{d}/device/vtpm"
        op = self.rng.choice(("write-key", "write-key", "new-device", "many-names", "remove", "remove-all",
                              "data", "mkdir"))
        try:
            if op == "write-key":
                xs.write(f"{base}/{self.rng.choice(('0', '1', '2'))}/{self.rng.choice(_KEYS)}", self._value())
            elif op == "new-device":
                xs.write(f"{base}/{self.rng.randrange(1, 5)}/backend", self._value())
            elif op == "many-names":
                for _ in range(self.rng.randrange(1, 20)):
                    xs.write(f"{base}/{self._node()}", self._value())
            elif op == "remove":
                xs.rm(f"{base}/{self.rng.choice(('0', '1', '0/state', '0/backend'))}")
            elif op == "remove-all":
                xs.rm(base)
            elif op == "data":
                xs.write(f"/local/domain/{d}/data/{self._node()}", self._value())
            else:
                xs.mkdir(f"{base}/{self._node()}/{self._node()}")
            self.ops[op] += 1
        except XenStoreError:
            self.ops[f"{op} refused"] += 1

    def _wait_connected(self, d: int) -> None:
        with XenStore(_sock(self.h)) as xs:
            while not self.stop.is_set() and xs.read_or(f"/local/domain/{d}/device/vtpm/0/state") != "4":
                if xs.read_or(f"/local/domain/{d}/name") != HOSTILE:
                    return
                time.sleep(0.05)

    def run(self) -> None:
        seen: set[int] = set()
        try:
            while not self.stop.is_set():
                d = domid(self.h, HOSTILE)
                if d is None:
                    time.sleep(0.05)
                    continue
                if d not in seen:
                    self._wait_connected(d)
                    seen.add(d)
                try:
                    with XenStore(f"{_sock(self.h)}.d{d}") as xs:
                        for _ in range(50):
                            if self.stop.is_set():
                                break
                            self._one(xs, d)
                            time.sleep(0.005)
                except XenStoreError:
                    self.ops["reconnect"] += 1     # the domain went away under us
                    time.sleep(0.05)
        except BaseException as exc:            # reported by the test, not lost in the thread
            self.error = exc


def test_hostile_guest_campaign(host, tmp_path):
    h = host
    seed = int(os.environ.get("XEN_VTPM_FUZZ_SEED", random.randrange(1 << 30)))
    print(f"\nhostile guest campaign, seed {seed} (XEN_VTPM_FUZZ_SEED={seed} repeats it)")
    fuzzer = HostileGuest(h, seed)
    fuzzer.start()
    try:
        assert_listed_correctly(h)
        hostile_at = ch.new_state(h.sim, HOSTILE)
        honest_at = ch.new_state(h.sim, GUEST)
        h.snapshot("fz-h", HOSTILE)
        h.snapshot("fz-g", GUEST)
        ch.new_state(h.sim, HOSTILE)
        honest_later = ch.new_state(h.sim, GUEST)
        h.tool("rollback", HOSTILE, "fz-h", "--yes")                  # with its safety checkpoint
        assert pair(h, HOSTILE) == hostile_at
        assert pair(h, GUEST) == honest_later, "the hostile guest's rollback touched the honest guest"
        h.tool("rollback", GUEST, "fz-g", "--yes", "--no-safety-checkpoint")
        assert pair(h, GUEST) == honest_at
        assert pair(h, HOSTILE) == hostile_at, "the honest guest's rollback touched the hostile guest"
        assert_listed_correctly(h)
        saved_at = ch.new_state(h.sim, HOSTILE)
        h.tool("save", HOSTILE, str(tmp_path / "hostile.save"))
        assert domid(h, HOSTILE) is None
        h.tool("restore", str(tmp_path / "hostile.save"))
        assert pair(h, HOSTILE) == saved_at
        assert pair(h, GUEST) == honest_at
        assert_listed_correctly(h)
        h.tool("verify", "--all")
    finally:
        fuzzer.stop.set()
        fuzzer.join(timeout=30)
    print(f"hostile guest operations: {dict(sorted(fuzzer.ops.items()))}")
    assert fuzzer.error is None, f"the fuzzer itself failed: {fuzzer.error!r}"
    assert not fuzzer.is_alive()
    done = sum(n for op, n in fuzzer.ops.items() if not op.endswith("refused") and op != "reconnect")
    assert done >= 100 and fuzzer.ops["many-names"] and fuzzer.ops["remove-all"], \
        f"the campaign hardly ran: {dict(fuzzer.ops)}"
    for name in ("fz-h", "fz-g"):
        h.tool("delete", name)
