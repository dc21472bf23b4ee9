"""End to end: `xen-vtpm save` / `restore` keep the guest memory and its vTPM a matching pair.

With the checkpoint-capable manager (and with an swtpm vTPM) a vTPM that moved on after the save is put
back; one that did not is left as it is.  With the stock manager (no checkpoint extension) save/restore stays guarded
(a vTPM that moved on makes restore refuse, and no guest is started) and per-VM snapshots and rollbacks
are refused.  Broken save files are refused before anything is touched.
"""
from __future__ import annotations

import pytest
from e2e_helpers import GUEST, VTPMS, e2e_host, saved_memory_digest


@pytest.fixture(scope="module", params=list(VTPMS.values()), ids=list(VTPMS))
def host(request, tmp_path_factory):
    """Save and restore put the vTPM back like a rollback: on every kind of vTPM."""
    backend, tpm_version = request.param
    with e2e_host(tmp_path_factory.mktemp("sr"), backend=backend, tpm_version=tpm_version) as h:
        h.provision_tpm()
        yield h


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    with e2e_host(tmp_path_factory.mktemp("stock"), stock_manager=True) as h:
        h.provision_tpm()
        yield h


def _save(host, path) -> dict:
    """Save the guest; it is gone afterwards, as with `xl save`.  Its vTPM stub domain still runs; an
    swtpm ended with the guest's device model (QEMU's CMD_SHUTDOWN at exit)."""
    result = host.tool_json("save", GUEST, str(path))
    domids = host.domids()
    assert GUEST not in domids
    if host.backend == "stubdom":
        assert f"vtpm-{GUEST}" in domids
    else:
        assert host.vtpm_instance() is None, "the swtpm must end with its device model"
    return result


def _move_on_while_saved(host, save_file) -> dict:
    """Someone uses the vTPM while its guest is saved: the stub domain serves anyone; an swtpm only a
    device model, so the file is restored with plain `xl` (the tool bypassed), used, and destroyed."""
    if host.backend == "stubdom":
        return host.advance_tpm(b"after save", host.vtpm_tcti())
    host.tool("vtpm", "start", GUEST)
    host.xl("restore", str(save_file))
    moved = host.advance_tpm(b"after save")
    host.xl("destroy", GUEST)
    return moved


def test_restore_puts_back_a_vtpm_that_moved_on(host, tmp_path):
    at_save = host.tpm_state()
    save_file = tmp_path / "guest1.save"
    _save(host, save_file)
    mem_at_save = saved_memory_digest(save_file)

    _move_on_while_saved(host, save_file)

    result = host.tool_json("restore", str(save_file), "--paused")
    assert result["vtpm_restored"] is True
    assert host.is_paused(GUEST)
    assert host.memdigest() == mem_at_save
    assert host.tpm_state() == at_save
    host.xl("unpause", GUEST)


def test_restore_leaves_an_unchanged_vtpm_alone(host, tmp_path):
    at_save = host.tpm_state()
    save_file = tmp_path / "guest1.save"
    _save(host, save_file)
    mem_at_save = saved_memory_digest(save_file)
    vtpm_instance = host.vtpm_instance()
    slots = host.slot_fingerprints()

    result = host.tool_json("restore", str(save_file), "--paused")
    assert result["vtpm_restored"] is False
    if host.backend == "stubdom":
        assert host.slot_fingerprints() == slots
        assert host.vtpm_instance() == vtpm_instance, "an unchanged vTPM must not be re-created"
    else:   # its swtpm ended with the saved guest: started again, on the state left as it was
        assert vtpm_instance is None and host.vtpm_instance() is not None
    assert host.memdigest() == mem_at_save
    host.xl("unpause", GUEST)
    assert not host.is_paused(GUEST)
    assert host.tpm_state() == at_save
    host.tool("verify", "--all")


@pytest.fixture(scope="module")
def saved_guest(host, tmp_path_factory):
    """guest1 saved to a file (so not running) for the broken-file cases; restored afterwards."""
    good = tmp_path_factory.mktemp("saved") / "good.save"
    _save(host, good)
    yield good
    host.tool("restore", str(good))


@pytest.mark.parametrize("damage", ["truncated-mid-stream", "truncated-header", "wrong-magic"])
def test_restore_of_a_broken_save_file_is_refused(host, saved_guest, tmp_path, damage):
    data = saved_guest.read_bytes()
    bad = tmp_path / f"{damage}.save"
    bad.write_bytes({"truncated-mid-stream": data[:len(data) // 2],
                     "truncated-header": data[:100],
                     "wrong-magic": b"XXXX" + data[4:]}[damage])
    before = host.domids(), host.vtpm_instance()
    slots = host.slot_fingerprints()
    host.fails(5, "restore", str(bad))
    assert (host.domids(), host.vtpm_instance()) == before and host.slot_fingerprints() == slots
    assert GUEST not in host.domids()


# --- stock manager ----------------------------------------------------------------------------

def test_stock_manager_refuses_snapshot_and_rollback(stock, tmp_path):
    before = stock.domids()
    line = stock.fails(4, "snapshot", GUEST, "--name", "st1")
    assert "stock" in line, line
    assert stock.domids() == before and not stock.is_paused(GUEST)

    # A save leaves a checkpoint behind; rolling the running guest back to it is still refused.
    save_file = tmp_path / "guest1.save"
    ckpt = _save(stock, save_file)["id"]
    stock.tool("restore", str(save_file))
    before = stock.domids()
    slots = stock.slot_fingerprints()
    line = stock.fails(4, "rollback", GUEST, ckpt, "--yes")
    assert "stock" in line, line
    assert stock.domids() == before and stock.slot_fingerprints() == slots


def test_stock_manager_save_restore_with_unchanged_vtpm(stock, tmp_path):
    at_save = stock.tpm_state()
    save_file = tmp_path / "guest1.save"
    _save(stock, save_file)
    mem_at_save = saved_memory_digest(save_file)

    result = stock.tool_json("restore", str(save_file), "--paused")
    assert result["vtpm_restored"] is False
    assert stock.memdigest() == mem_at_save
    stock.xl("unpause", GUEST)
    assert stock.tpm_state() == at_save


def test_stock_manager_refuses_restore_when_the_vtpm_moved_on(stock, tmp_path):
    save_file = tmp_path / "guest1.save"
    _save(stock, save_file)
    moved = stock.advance_tpm(b"after save", stock.vtpm_tcti())
    before = stock.domids()
    slots = stock.slot_fingerprints()

    line = stock.fails(4, "restore", str(save_file))
    assert "stock" in line or "advanced" in line, line
    assert GUEST not in stock.domids(), "the guest must not be started against a vTPM that moved on"
    assert stock.domids() == before and stock.slot_fingerprints() == slots
    assert stock.tpm_state(stock.vtpm_tcti()) == moved
