"""End to end on the simulated host: `prune`, `keep` and `unkeep`.

prune keeps what its rules, the `keep` marks and the save bindings say, frees storage as `delete` does
(the bytes it reports are the bytes gone from the state dir, the manager's entries of what it removed
are discarded) and is one audited operation.  The marks are bound to the TPM-anchored catalog head:
a mark removed or added behind the tool's back is refused like any other tampering, with nothing changed.
"""
from __future__ import annotations

import contextlib
import json
import sqlite3

import pytest
from crash_helpers import manager_keeps
from e2e_helpers import GUEST, E2EHost, e2e_host


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    with e2e_host(tmp_path_factory.mktemp("prune")) as h:
        yield h


def _db(host: E2EHost) -> sqlite3.Connection:
    return sqlite3.connect(host.catalog, isolation_level=None)


def store_bytes(host: E2EHost) -> int:
    return sum(p.stat().st_size for d in ("packs", "manifests") for p in (host.state_dir / d).iterdir())


def state(host: E2EHost) -> dict:
    """Everything a refused command must leave as it was."""
    with contextlib.closing(_db(host)) as db:
        ckpts = sorted(r[0] for r in db.execute("SELECT id FROM checkpoints"))
        holds = sorted(r[0] for r in db.execute("SELECT checkpoint FROM holds"))
        head = db.execute("SELECT counter, seq FROM head WHERE kind='current'").fetchone()
        ops = db.execute("SELECT count(*) FROM op_journal").fetchone()[0]
    files = sorted(p.name for d in ("packs", "manifests") for p in (host.state_dir / d).iterdir())
    return {"checkpoints": ckpts, "holds": holds, "head": head, "ops": ops, "files": files}


def ids(host: E2EHost) -> dict[str, str]:
    return {c["name"]: c["id"] for c in host.tool_json("checkpoints", GUEST)}


def audit(host: E2EHost) -> list[dict]:
    return host.tool_json("audit")


@pytest.fixture(autouse=True)
def clean_slate(host):
    """Each test starts with no checkpoint of guest1 and no mark."""
    yield
    for c in host.tool_json("checkpoints"):
        if c["kept"]:
            host.tool("unkeep", c["id"])
        host.tool("delete", c["id"])


def test_prune_keeps_the_rules_marks_and_save_bindings_and_frees_what_delete_frees(host, tmp_path):
    host.snapshot("p1")
    host.tool("keep", "p1")
    host.snapshot("p2")
    host.snapshot("p3")
    save = tmp_path / "guest1.save"
    host.tool("save", GUEST, str(save))
    host.tool("restore", str(save))
    host.snapshot("p4")
    before = ids(host)
    saved = next(i for n, i in before.items() if n.startswith("save-"))

    dry = host.tool_json("prune", GUEST, "--keep-last", "1", "--dry-run")
    assert state(host)["checkpoints"] == sorted(before.values()), "a dry run removed something"
    bytes_before = store_bytes(host)
    result = host.tool_json("prune", GUEST, "--keep-last", "1")
    assert [{k: v for k, v in r.items() if k not in ("dry_run", "freed_bytes")} for r in dry] == \
        [{k: v for k, v in r.items() if k not in ("dry_run", "freed_bytes")} for r in result], \
        "the dry run announced something else than what prune did"
    (res,) = result
    assert res["domain"] == GUEST and not res["dry_run"]
    save_name = next(n for n, i in before.items() if i == saved)
    assert {e["name"]: e["rules"] for e in res["kept"]} == {
        "p4": ["last #1"], "p1": ["keep-mark"], save_name: ["save-binding"]}
    assert sorted(e["name"] for e in res["removed"]) == ["p2", "p3"]
    assert all(e["rules"] == [] for e in res["removed"])
    assert sorted(ids(host)) == sorted(n for n in before if n not in ("p2", "p3"))
    # Storage: what it reports is what left the state dir; nothing of p2/p3 stays (verify checks every
    # refcount of the survivors, the file listing every pack and manifest against the catalog).
    assert res["freed_bytes"] > 0 and res["freed_bytes"] == bytes_before - store_bytes(host)
    st = state(host)
    assert {f[:-len(".manifest")] for f in st["files"] if f.endswith(".manifest")} == set(st["checkpoints"])
    host.tool("verify", "--all")
    assert not manager_keeps(host.sim, before["p2"]) and not manager_keeps(host.sim, before["p3"])
    assert manager_keeps(host.sim, before["p4"]) and manager_keeps(host.sim, before["p1"])
    # One audited operation naming what it removed, its end anchored like every change.
    rec = [r for r in audit(host) if r["action"] == "prune"][-1]
    assert rec["result"] == "ok" and set(rec["checkpoint"].split()) == {before["p2"], before["p3"]}
    assert rec["detail"].startswith("op ")
    host.tool("audit", "--verify")

    # --include-saves makes the save binding a candidate; the mark still holds p1.
    (inc,) = host.tool_json("prune", GUEST, "--keep-last", "1", "--include-saves", "--dry-run")
    assert [e["id"] for e in inc["removed"]] == [saved]


def test_prune_never_removes_the_newest_and_with_all_prunes_every_vm(host):
    host.snapshot("n1")
    host.snapshot("n2")
    out = host.tool("prune", GUEST, "--keep-monthly", "1", "--dry-run").stdout.splitlines()
    assert out[0] == f"{GUEST}: kept 1, would remove 1"
    assert out[1].split() == ["ACTION", "ID", "NAME", "KIND", "TIME", "RULES"]
    assert out[2].split()[0] == "keep" and " n2 " in out[2] and out[2].endswith("monthly #1")
    assert out[3].startswith("would remove") and " n1 " in out[3]
    (res,) = host.tool_json("prune", "--all", "--keep-monthly", "1")
    # one month: its newest is kept, the older one goes
    assert [e["name"] for e in res["kept"]] == ["n2"] and [e["name"] for e in res["removed"]] == ["n1"]
    assert res["kept"][0]["rules"] == ["monthly #1"]


def test_prune_uses_the_retention_section_of_the_config(host, tmp_path):
    for name in ("c1", "c2"):
        host.snapshot(name)
    cfg = host.with_config(tmp_path)
    conf = tmp_path / "xen-vtpm.conf"
    conf.write_text(conf.read_text() + "\n[retention]\nkeep_last = 3\n[retention.guest1]\nkeep_last = 1\n")
    (res,) = cfg.tool_json("prune", GUEST)   # the guest's own section over the general one
    assert [e["name"] for e in res["kept"]] == ["c2"] and [e["name"] for e in res["removed"]] == ["c1"]


def test_keep_protects_from_delete_until_unkeep(host):
    host.snapshot("k1")
    host.tool("keep", "k1")
    host.tool("keep", "k1")                       # again: nothing to do, still kept
    kept = state(host)
    line = host.fails(4, "delete", "k1")
    assert "marked with `keep`" in line and "unkeep" in line
    assert state(host) == kept
    assert [c["kept"] for c in host.tool_json("checkpoints", GUEST)] == [True]
    host.tool("unkeep", "k1")
    assert [c["kept"] for c in host.tool_json("checkpoints", GUEST)] == [False]
    host.tool("delete", "k1")
    assert ids(host) == {}
    actions = [r["action"] for r in audit(host)]
    assert actions.count("keep") >= 1 and actions.count("unkeep") >= 1


def test_a_mark_changed_behind_the_tool_is_refused_and_nothing_changes(host):
    """An attacker with the state dir removes a mark to get a checkpoint pruned, or adds one to keep it."""
    host.snapshot("a1")
    host.snapshot("a2")
    marked, other = ids(host)["a1"], ids(host)["a2"]
    host.tool("keep", "a1")
    for attack in ("DELETE FROM holds", f"INSERT INTO holds VALUES ('{other}')"):
        with contextlib.closing(_db(host)) as db:
            db.execute(attack)
        tampered = state(host)
        for argv in (["prune", GUEST, "--keep-last", "1"], ["prune", GUEST, "--keep-last", "1", "--dry-run"],
                     ["keep", "a2"], ["unkeep", "a1"], ["delete", "a2"]):
            line = host.fails(5, *argv)
            assert "catalog" in line and "rows differ" in line, (attack, line)
            assert state(host) == tampered, f"{attack}: {' '.join(argv)} changed the store"
        with contextlib.closing(_db(host)) as db:   # put the mark back as the tool left it
            db.execute("DELETE FROM holds")
            db.execute("INSERT INTO holds VALUES (?)", (marked,))
        host.tool("verify", "--all")
    assert any(r["action"] == "prune" and r["result"].startswith("refused") for r in audit(host))


BAD_INPUT = [
    (["prune", GUEST], 2, "no rule given"),
    (["prune", "--keep-last", "1"], 2, "name one DOMAIN or pass --all"),
    (["prune", GUEST, "--all", "--keep-last", "1"], 2, "name one DOMAIN or pass --all"),
    (["prune", GUEST, "--keep-daily", "-2"], 2, "invalid count"),
    (["prune", "nosuchguest", "--keep-last", "1"], 3, "nosuchguest"),
    (["keep", "nosuchcheckpoint"], 3, "not found"),
]


def test_bad_input_is_one_line_and_changes_nothing(host):
    host.snapshot("b1")
    before = state(host)
    for argv, code, words in BAD_INPUT:
        assert words in host.fails(code, *argv), argv
        assert state(host) == before, argv
