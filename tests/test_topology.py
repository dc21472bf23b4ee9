"""`xen-vtpm list` on a simulated host: the guest → vTPM → manager chain and UUID cross-checks."""
import json
import re

import pytest
from sim_fixture import sim_host_module  # noqa: F401

from xen_vtpm.config import Config
from xen_vtpm.xen import topology


@pytest.fixture(scope="module")
def host(sim_host_module):
    sim_host_module.create_guest("g1")
    sim_host_module.create_guest("bare", vtpm=False)
    return sim_host_module


def rows_by_name(host):
    return {r["name"]: r for r in json.loads(host.tool("--json", "list").stdout)}


def test_list_json_shows_the_chain(host):
    rows = rows_by_name(host)
    assert [r["name"] for r in rows.values()] == ["Domain-0", "vtpmmgr", "vtpm-g1", "g1", "bare"]
    mgr, stub, guest = rows["vtpmmgr"], rows["vtpm-g1"], rows["g1"]
    assert (mgr["role"], stub["role"], guest["role"], rows["bare"]["role"]) == ("vtpmmgr", "vtpm", "guest", "guest")
    assert mgr["serves"] == [stub["domid"]] and stub["serves"] == [guest["domid"]]
    cfg_uuid = re.search(r"uuid=([0-9a-f-]{36})", (host.dir / "images" / "vtpm-g1.cfg").read_text()).group(1)
    (link,) = stub["vtpms"]
    assert (link["backend_name"], link["backend_domid"], link["uuid"], link["uuid_check"]) == \
        ("vtpmmgr", mgr["domid"], cfg_uuid, "ok")
    (dev,) = guest["vtpms"]
    assert (dev["devid"], dev["backend_name"], dev["state"], dev["backend_state"], dev["uuid_check"]) == \
        (0, "vtpm-g1", "4", "4", "ok")
    assert dev["uuid"] == dev["backend_uuid"]
    assert guest["state"] in ("r-----", "-b----") and rows["bare"]["vtpms"] == []


def test_list_text(host):
    out = host.tool("list").stdout
    assert out.splitlines()[0].split() == ["DOMID", "NAME", "ROLE", "STATE", "VTPM", "BACKEND", "FE_STATE",
                                           "BE_STATE", "UUID", "CHECK"]
    assert re.search(r"^\d+\s+g1\s+guest\s+\S+\s+0\s+vtpm-g1 \(\d+\)\s+4 Connected\s+4 Connected\s+[0-9a-f-]{36}\s+ok$",
                     out, re.M)


def test_backend_uuid_mismatch_is_reported_not_trusted(host):
    guest = rows_by_name(host)["g1"]
    dev = guest["vtpms"][0]
    forged = "00000000-1111-2222-3333-444444444444"
    host.run(["xenstore-write", f"{dev['backend_path']}/uuid", forged])
    try:
        after = rows_by_name(host)["g1"]["vtpms"][0]
        assert after["uuid"] == dev["uuid"]            # still the /libxl trusted copy
        assert after["backend_uuid"] == forged
        assert after["uuid_check"] == f"MISMATCH: backend uuid {forged}"
        assert f"MISMATCH: backend uuid {forged}" in host.tool("list").stdout
        # Same answer from the library, with the config the sim wrote.
        (row,) = [r for r in topology.list_domains(Config.load(host.config)) if r["name"] == "g1"]
        assert row["vtpms"][0]["uuid_check"].startswith("MISMATCH")
    finally:
        host.run(["xenstore-write", f"{dev['backend_path']}/uuid", dev["uuid"]])
