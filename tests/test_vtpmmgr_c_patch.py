"""The xen-vtpm patch series for Xen 4.17's stubdom/vtpmmgr (checkpoint extension, UBSan fixes, TPM 2.0
persistence, NV counter): it applies to Xen's source (Debian's xen source package, fetched into a
cache outside the repository), adds exactly the files in vtpmmgr/src/, and every file it touches
compiles with the shim under -Wall -Werror."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VTPMMGR = ROOT / "vtpmmgr"
PATCHES = sorted((VTPMMGR / "patches").glob("*.patch"))
SUBJECTS = ["vtpmmgr: checkpoint extension", "vtpmmgr: fix undefined behaviour found by UBSan",
            "vtpmmgr: persist on TPM 2.0 hosts", "vtpmmgr: anti-rollback of the manager's disk"]
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "xen-vtpm"
# As Xen's stubdom build (stubdom/vtpmmgr/Makefile: -Werror), plus what mini-os's flags relax.
CFLAGS = ["-std=gnu99", "-c", "-Wall", "-Werror", "-Wno-declaration-after-statement", "-Wno-unused-label",
          "-Wno-address-of-packed-member"]


@pytest.fixture(scope="module")
def xen_source() -> Path:
    out = subprocess.run([str(VTPMMGR / "tools" / "fetch-xen-source.sh"), str(CACHE)], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    src = Path(out.stdout.strip())
    assert (src / "stubdom" / "vtpmmgr" / "vtpm_cmd_handler.c").is_file()
    return src


@pytest.fixture
def patched(tmp_path, xen_source) -> Path:
    tree = tmp_path / "xen"
    shutil.copytree(xen_source / "stubdom" / "vtpmmgr", tree / "stubdom" / "vtpmmgr")
    subprocess.run(["git", "init", "-q"], cwd=tree, check=True)
    # git apply is strict: no fuzz, no offset guessing beyond exact context; in series order.
    for patch in PATCHES:
        out = subprocess.run(["git", "apply", "--whitespace=error-all", str(patch)], cwd=tree,
                             capture_output=True, text=True)
        assert out.returncode == 0, f"{patch.name}: {out.stderr}"
    return tree / "stubdom" / "vtpmmgr"


def _patch_files(patch: Path) -> tuple[set[str], set[str]]:
    added, changed = set(), set()
    lines = patch.read_text().splitlines()
    for before, line in zip(lines, lines[1:], strict=False):
        if line.startswith("+++ b/stubdom/vtpmmgr/"):
            name = line.removeprefix("+++ b/stubdom/vtpmmgr/")
            (added if before == "--- /dev/null" else changed).add(name)
    return added, changed


def test_the_series_is_git_format_patches():
    assert [p.name[:4] for p in PATCHES] == ["0001", "0002", "0003", "0004"]
    for patch, subject in zip(PATCHES, SUBJECTS, strict=True):
        text = patch.read_text()
        first = text.splitlines()[0]
        assert first.startswith("From ") and first.endswith(" Mon Sep 17 00:00:00 2001")
        assert f"\nSubject: [PATCH] {subject}" in text
    files = [_patch_files(p) for p in PATCHES]
    assert files[0] == ({"vtpm_checkpoint.c", "vtpm_checkpoint.h", "ckpt_request.c", "ckpt_request.h",
                         "vtpm_transfer.c", "vtpm_transfer.h", "xfer_request.c", "xfer_request.h", "xfer_envelope.c",
                         "xfer_envelope.h", "xfer_tpm2.c", "xfer_tpm2.h", "xfer_transmit_xen.c"},
                        {"Makefile", "init.c", "vtpm_cmd_handler.c", "vtpm_disk.h", "vtpmmgr.c"})
    assert files[1] == (set(), {"tpm2_types.h", "init.c", "disk_write.c"})
    assert files[2][0] == {"tpm2_cmd.c", "tpm2_cmd.h", "tpm2_seal.c", "tpm2_seal.h", "vtpm_status.c",
                           "vtpm_status.h"}
    assert files[3][0] == {"tpm2_counter.c", "tpm2_counter.h"}
    # Every file of src/ is added by one patch, and no later patch changes it (refresh-patches.sh).
    added = [name for a, _ in files for name in a]
    assert sorted(added) == sorted(p.name for p in (VTPMMGR / "src").iterdir())
    for i, (a, _) in enumerate(files):
        assert not a & set().union(*(c for _, c in files[i + 1:]))


def test_the_series_applies_and_adds_src_verbatim(patched):
    for patch in PATCHES:
        for name in _patch_files(patch)[0]:
            assert (patched / name).read_bytes() == (VTPMMGR / "src" / name).read_bytes(), \
                f"{name}: vtpmmgr/src and {patch.name} differ; run vtpmmgr/tools/refresh-patches.sh"
    assert "vtpm_checkpoint.o ckpt_request.o" in (patched / "Makefile").read_text()
    # every transfer object, the stub domain's transport (Xen's TPM_TransmitData) included
    assert "vtpm_transfer.o xfer_request.o xfer_envelope.o xfer_tpm2.o xfer_transmit_xen.o" in \
        (patched / "Makefile").read_text()
    assert "tpm2_cmd.o tpm2_seal.o vtpm_status.o tpm2_counter.o" in (patched / "Makefile").read_text()
    assert "#define VTPM_FLAG_CHECKPOINT 2" in (patched / "vtpm_disk.h").read_text()
    handler = (patched / "vtpm_cmd_handler.c").read_text()
    assert "opq->vtpm->flags & VTPM_FLAG_CHECKPOINT" in handler          # find_vtpm_verified refuses
    assert "vtpm_ckpt_is_checkpoint(*opq->uuid)" in handler              # no auto-create over one
    main = (patched / "vtpmmgr.c").read_text()
    assert "vtpm_ckpt_handle_cmd(tpmcmd->opaque, tpmcmd)" in main and "vtpm_ckpt_start(argc, argv)" in main
    assert "vtpm_status_publish()" in main
    init = (patched / "init.c").read_text()
    assert "vtpm_ckpt_conn_opened(opq)" in init and "vtpm_ckpt_conn_closed(opq)" in init
    assert "tpm2_seal_disk_is_blank()" in init and "SK HANDLE" not in init   # no per-boot storage key
    disk_tpm = (patched / "disk_tpm.c").read_text()
    assert "return tpm2_seal(dst, src, size);" in disk_tpm and "TPM2_Bind(" not in disk_tpm
    assert "return tpm2_counter_check(slot, &auth, value);" in disk_tpm
    assert "depth = CTR_UPDATE;" in (patched / "vtpm_disk.c").read_text()     # every write is counted
    # The TPM 1.2 path is as Xen has it: TPM_Seal/TPM_Unseal, and the counter stubs after the TPM 2.0 branch.
    assert disk_tpm.count("TPM_Seal(TPM_SRK_KEYHANDLE") == 1 and disk_tpm.count("// TODO-3") == 8


@pytest.mark.parametrize("name", ["vtpm_checkpoint.c", "ckpt_request.c", "tpm2_cmd.c", "tpm2_seal.c",
                                  "tpm2_counter.c", "vtpm_status.c", "vtpm_cmd_handler.c", "vtpmmgr.c",
                                  "init.c", "tpm2.c", "vtpm_disk.c", "disk_tpm.c", "disk_read.c",
                                  "disk_write.c", "vtpm_transfer.c", "xfer_request.c", "xfer_envelope.c",
                                  "xfer_tpm2.c", "xfer_transmit_xen.c"])
def test_patched_file_compiles_with_the_shim(patched, name):
    out = subprocess.run(["gcc", *CFLAGS, f"-I{VTPMMGR / 'shim' / 'include'}", f"-I{patched}", name,
                          "-o", os.devnull], cwd=patched, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_a_broken_tree_is_refused(tmp_path, xen_source):
    """The check above can fail: a Xen tree whose context the patch does not match is refused."""
    tree = tmp_path / "xen" / "stubdom" / "vtpmmgr"
    shutil.copytree(xen_source / "stubdom" / "vtpmmgr", tree)
    init = tree / "init.c"
    init.write_text(init.read_text().replace("tpmback_set_opaque(domid, handle, opq);", "/* gone */"))
    out = subprocess.run(["git", "apply", "--check", str(PATCHES[0])], cwd=tmp_path / "xen",
                         capture_output=True, text=True)
    assert out.returncode != 0 and "init.c" in out.stderr


def test_native_build_from_a_clean_tree(tmp_path, xen_source):
    """What `make setup` runs: patch Xen's files and link the simulator's manager (ASan + UBSan)."""
    build = tmp_path / "build"
    out = subprocess.run(["make", "-s", "-C", str(VTPMMGR), f"BUILD={build}", f"CACHE={CACHE}"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    binary = build / "vtpmmgr-native"
    libs = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    assert "libasan" in libs and "libubsan" in libs and "libxenstore" in libs
    usage = subprocess.run([str(binary)], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 64 and "usage: vtpmmgr-native" in usage.stderr
