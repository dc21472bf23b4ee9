"""xl save files: writer, stream reader and the tool's header parser.

Xen's own verifier (verify-stream-v2 from xen-utils) is the referee for the
format; the reader is checked against the writer and against hand-built records.
"""
from __future__ import annotations

import hashlib
import io
import mmap
import os
import struct
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xen_vtpm.errors import MalformedSaveFile
from xen_vtpm.xen.devicemodel import tpm_args
from xen_vtpm.xen.savefile import HEADER, SaveHeader, read_save_header, relink_emulator_tpm
from xen_vtpm_sim import savestream as ss

XEN_PY = Path("/usr/lib/xen-4.17/lib/python")
VERIFIER = Path("/usr/lib/xen-4.17/bin/verify-stream-v2")

PAGE = 4096
VTPM_UUID = "ac0a5b9e-cbe2-4c07-b43b-1d69e46fb839"
CONFIG = {
    "c_info": {"type": "hvm", "name": "guest1", "uuid": "6e1c0b6a-2d4e-4bb3-9b0a-0a2a3c4d5e6f"},
    "b_info": {"max_memkb": 65536, "target_memkb": 65536, "max_vcpus": 1},
    "vtpms": [{"backend_domid": 3, "backend_domname": "vtpm-guest1", "devid": 0, "uuid": VTPM_UUID}],
}


def save_bytes(memory, config=CONFIG) -> bytes:
    buf = io.BytesIO()
    ss.write_save(buf, config, memory, domid=7)
    return buf.getvalue()


def verify(path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(XEN_PY))
    return subprocess.run([str(VERIFIER), "-f", "xl", "-i", str(path)], env=env,
                          capture_output=True, text=True, timeout=60)


def memory_of(kind: str, size: int) -> bytearray:
    if kind == "random":
        return bytearray(os.urandom(size))
    if kind == "zero":
        return bytearray(size)
    pattern = b"guest page \x00\x01" * 8
    return bytearray((pattern * (size // len(pattern) + 1))[:size])


# --- round trip ----------------------------------------------------------------

@pytest.mark.parametrize("size,kind", [
    (PAGE, "random"), (PAGE, "zero"), (17 * PAGE, "pattern"),
    (1024 * PAGE, "random"), (1025 * PAGE, "pattern"), (3000 * PAGE, "zero"),
    (64 << 20, "random"),
])
def test_round_trip_restores_memory_byte_for_byte(tmp_path, size, kind):
    mem = memory_of(kind, size)
    path = tmp_path / "guest.sav"
    with open(path, "wb") as out:
        ss.write_save(out, CONFIG, mem, domid=7)
    restored = bytearray(b"\xa5" * size)  # poison: every page must be overwritten
    with open(path, "rb") as inp:
        info = ss.read_save(inp, restored)
    assert restored == mem
    assert info.pages == size // PAGE
    assert info.libxc_version == 3
    assert info.hvm_params == ss.HVM_PARAMS
    assert info.header.vtpms[0]["uuid"] == VTPM_UUID
    assert info.header.config["c_info"]["name"] == "guest1"


def test_file_object_and_descriptor_paths_write_identical_bytes(tmp_path):
    mem = memory_of("random", 1500 * PAGE)
    path = tmp_path / "g.sav"
    with open(path, "wb") as out:       # real descriptor: gathered os.writev
        ss.write_save(out, CONFIG, mem, domid=7)
    assert path.read_bytes() == save_bytes(mem)   # BytesIO: plain write()


def test_empty_guest_and_bad_memory_size():
    data = save_bytes(b"")
    assert ss.read_save(io.BytesIO(data), bytearray()).pages == 0
    with pytest.raises(ValueError, match="multiple of 4096"):
        ss.write_save(io.BytesIO(), CONFIG, bytes(100), domid=7)


def test_writer_memory_is_bounded_by_one_batch():
    mem = memory_of("pattern", 32 << 20)
    sink = open(os.devnull, "wb")
    tracemalloc.start()
    try:
        ss.write_save(sink, CONFIG, mem, domid=7)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        sink.close()
    assert peak < 1 << 20  # never a copy of the 32 MiB guest, only batch headers


def test_read_only_mmap_of_a_memory_file_is_a_valid_source(tmp_path):
    """The simulated guest keeps its memory in a file; xl save maps it read-only."""
    memfile = tmp_path / "guest.mem"
    memfile.write_bytes(memory_of("random", 1100 * PAGE))
    with open(memfile, "rb") as fh, mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) as mm:
        data = save_bytes(mm)
    restored = bytearray(1100 * PAGE)
    ss.read_save(io.BytesIO(data), restored)
    assert restored == memfile.read_bytes()


def test_failed_read_leaves_the_target_mmap_closable():
    """No view of memory_out may survive in the traceback, or the caller's mmap cannot close."""
    data = save_bytes(memory_of("random", 8 * PAGE))
    # The mmap closes while the exception is in flight, as in `with mmap(...) as mm: read_save(f, mm)`.
    with pytest.raises(MalformedSaveFile, match="truncated inside PAGE_DATA pages"):
        with mmap.mmap(-1, 8 * PAGE) as mm:
            ss.read_save(io.BytesIO(data[:len(data) // 2]), mm)


def test_broken_pipe_leaves_the_source_mmap_closable(tmp_path):
    fifo = tmp_path / "save.fifo"
    os.mkfifo(fifo)
    def early_quitter():
        with open(fifo, "rb") as inp:
            inp.read(PAGE)

    t = threading.Thread(target=early_quitter)
    t.start()
    try:
        with pytest.raises(BrokenPipeError):
            with open(fifo, "wb") as out, mmap.mmap(-1, 4096 * PAGE) as mm:
                ss.write_save(out, CONFIG, mm, domid=7)
    finally:
        t.join(timeout=60)


# --- Xen's verifier ---------------------------------------------------------------

@pytest.mark.parametrize("pages", [0, 1, 1024, 1025, 4097])
def test_xen_verifier_accepts_written_files(tmp_path, pages):
    path = tmp_path / "guest.sav"
    path.write_bytes(save_bytes(memory_of("random", pages * PAGE)))
    res = verify(path)
    assert res.returncode == 0, res.stderr


def test_xen_verifier_rejects_a_damaged_file(tmp_path):
    """The referee is not a rubber stamp: an unknown record type must fail it."""
    data = bytearray(save_bytes(memory_of("random", 2 * PAGE)))
    # The stream ends HVM_PARAMS, libxc END (8 bytes), libxl END (8 bytes): retype HVM_PARAMS.
    data[len(data) - 16 - len(ss.hvm_params_record(ss.HVM_PARAMS))] = 0x7F
    path = tmp_path / "bad.sav"
    path.write_bytes(bytes(data))
    assert verify(path).returncode != 0
    with pytest.raises(MalformedSaveFile, match="unknown libxc record type 0x7f"):
        ss.read_save(io.BytesIO(bytes(data)), bytearray(2 * PAGE))


def libxc_prefix(config=CONFIG) -> bytes:
    return (ss.xl_header(config) + ss.libxl_header() + ss.record(ss.LibxlRec.LIBXC_CONTEXT)
            + ss.libxc_headers() + ss.record(ss.LibxcRec.STATIC_DATA_END))


def libxc_suffix() -> bytes:
    return (ss.hvm_context_record() + ss.hvm_params_record(ss.HVM_PARAMS)
            + ss.record(ss.LibxcRec.END) + ss.record(ss.LibxlRec.END))


def page_data(entries: list[int], pages: list[bytes]) -> bytes:
    body = struct.pack("=II", len(entries), 0) + struct.pack(f"={len(entries)}Q", *entries) + b"".join(pages)
    return ss.record(ss.LibxcRec.PAGE_DATA, body)


def test_reader_handles_scattered_batches_with_holes(tmp_path):
    """libxc batches need not be contiguous; XTAB/XALLOC entries carry no data."""
    pages = {pfn: os.urandom(PAGE) for pfn in (9, 2, 5)}
    xtab, xalloc = 0xF << 60, 0xE << 60
    stream = (libxc_prefix() + ss.tsc_info_record()
              + page_data([9, xtab | 3, 2, xalloc | 4, 5], [pages[9], pages[2], pages[5]])
              + libxc_suffix())
    path = tmp_path / "scattered.sav"
    path.write_bytes(stream)
    assert verify(path).returncode == 0
    mem = bytearray(b"\x11" * (10 * PAGE))
    info = ss.read_save(io.BytesIO(stream), mem)
    assert info.pages == 3
    for pfn in range(10):
        want = pages.get(pfn, b"\x11" * PAGE)
        assert mem[pfn * PAGE:(pfn + 1) * PAGE] == want, pfn


# --- fifos ------------------------------------------------------------------------

def test_write_and_read_through_a_fifo(tmp_path):
    fifo = tmp_path / "save.fifo"
    os.mkfifo(fifo)
    mem = memory_of("random", 2000 * PAGE)
    errors = []

    def writer():
        try:
            with open(fifo, "wb") as out:
                ss.write_save(out, CONFIG, mem, domid=7)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    restored = bytearray(len(mem))
    try:
        with open(fifo, "rb", buffering=0) as inp:  # raw: short reads, as from a real pipe
            info = ss.read_save(inp, restored)
    finally:
        t.join(timeout=60)
    assert not errors and not t.is_alive()
    assert restored == mem and info.pages == 2000


def test_reader_in_another_process_reads_a_fifo(tmp_path):
    fifo = tmp_path / "save.fifo"
    os.mkfifo(fifo)
    mem = memory_of("random", 1300 * PAGE)
    code = ("import sys, hashlib; from xen_vtpm_sim.savestream import read_save\n"
            f"m = bytearray({len(mem)})\n"
            "with open(sys.argv[1], 'rb') as f: info = read_save(f, m)\n"
            "print(hashlib.sha256(m).hexdigest(), info.header.vtpms[0]['uuid'])\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(fifo)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    try:
        with open(fifo, "wb") as out:
            ss.write_save(out, CONFIG, mem, domid=7)
        out_text, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert out_text.split() == [hashlib.sha256(mem).hexdigest(), VTPM_UUID]


# --- header parser ------------------------------------------------------------------

def header_of(data: bytes) -> SaveHeader:
    return read_save_header(io.BytesIO(data))


def test_header_fields_and_stream_offset(tmp_path):
    data = save_bytes(memory_of("zero", PAGE))
    path = tmp_path / "g.sav"
    path.write_bytes(data)
    hdr = read_save_header(path)
    assert hdr.mandatory_flags == 3 and hdr.optional_flags == 0
    assert hdr.vtpms == [{"uuid": VTPM_UUID, "backend_domname": "vtpm-guest1", "backend_domid": 3, "devid": 0}]
    assert data[hdr.stream_offset:hdr.stream_offset + 8] == struct.pack("!Q", 0x4C6962786C466D74)
    with open(path, "rb") as fh:  # a file object is left at the libxl stream
        assert read_save_header(fh).stream_offset == fh.tell()


def test_header_layout_is_what_xl_writes():
    data = ss.xl_header(CONFIG)
    magic, order, mflags, oflags, optlen = HEADER.unpack_from(data)
    assert magic == b"Xen saved domain, xl format\n \0 \r" and order == 0x01020304
    assert (mflags, oflags, optlen) == (3, 0, len(data) - 48)
    (config_len,) = struct.unpack_from("=I", data, 48)
    assert config_len == optlen - 4 and data[-1] == 0 and b"\0" not in data[52:-1]


def test_libxl_defaults_are_filled_in_for_vtpms():
    """libxl omits fields at their default: backend_domid 0, devid 0, no name."""
    cfg = {"c_info": {"name": "g"}, "vtpms": [{"uuid": VTPM_UUID.upper()}, {"backend_domname": "vtpm2", "devid": 1}]}
    assert header_of(ss.xl_header(cfg)).vtpms == [
        {"uuid": VTPM_UUID, "backend_domname": None, "backend_domid": 0, "devid": 0},
        {"uuid": None, "backend_domname": "vtpm2", "backend_domid": 0, "devid": 1}]
    assert header_of(ss.xl_header({"c_info": {}})).vtpms == []


def test_truncation_at_every_header_byte(tmp_path):
    data = ss.xl_header(CONFIG)
    for n in range(len(data)):
        with pytest.raises(MalformedSaveFile) as exc:
            header_of(data[:n])
        msg = str(exc.value)
        assert "\n" not in msg and "offset" in msg, msg
    path = tmp_path / "cut.sav"
    path.write_bytes(data[:60])
    with pytest.raises(MalformedSaveFile, match=rf"^{path}: offset 60: truncated"):
        read_save_header(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(MalformedSaveFile, match="cannot read save file"):
        read_save_header(tmp_path / "nope.sav")


def patched(data: bytes, offset: int, fmt: str, value) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def test_wrong_magic_and_byte_order():
    data = ss.xl_header(CONFIG)
    with pytest.raises(MalformedSaveFile, match="offset 0: wrong magic"):
        header_of(b"Xen saved domain, xm format" + data[27:])
    with pytest.raises(MalformedSaveFile, match="offset 32: wrong byte-order mark 0x04030201 .*other endianness"):
        header_of(patched(data, 32, "=I", 0x04030201))


@pytest.mark.parametrize("bit", range(32))
def test_flipped_flag_bits(bit):
    data = ss.xl_header(CONFIG)
    flipped_mandatory = patched(data, 36, "=I", 3 ^ (1 << bit))
    if bit == 1:  # STREAMv2 cleared: header still readable (legacy stream behind it)
        assert header_of(flipped_mandatory).mandatory_flags == 1
    elif bit == 0:
        with pytest.raises(MalformedSaveFile, match="no JSON domain config"):
            header_of(flipped_mandatory)
    else:
        with pytest.raises(MalformedSaveFile, match=f"unsupported mandatory flags 0x{1 << bit:x}"):
            header_of(flipped_mandatory)
    # Optional flags are optional by definition: xl ignores the ones it does not know.
    assert header_of(patched(data, 40, "=I", 1 << bit)).optional_flags == 1 << bit


def test_absurd_lengths_are_refused_before_reading():
    data = ss.xl_header(CONFIG)
    with pytest.raises(MalformedSaveFile, match="offset 44: optional data length 4294967295 exceeds the 16 MiB"):
        header_of(patched(data, 44, "=I", 0xFFFFFFFF))
    with pytest.raises(MalformedSaveFile, match="config length 4294967295 exceeds the optional data"):
        header_of(patched(data, 48, "=I", 0xFFFFFFFF))
    with pytest.raises(MalformedSaveFile, match="has no config length"):
        header_of(patched(data, 44, "=I", 2))


def raw_header(blob: bytes, flags: int = 3) -> bytes:
    optional = struct.pack("=I", len(blob)) + blob
    return HEADER.pack(ss.SAVE_MAGIC, 0x01020304, flags, 0, len(optional)) + optional


@pytest.mark.parametrize("blob,defect", [
    (b'{"c_info": {}}', "not NUL-terminated"),
    (b'{"c_info": {}}\0x\0', "NUL byte inside"),
    (b'{"c_info": \xff}\0', "not valid UTF-8"),
    (b'{"c_info": {}\0', "bad JSON config"),
    (b'[1, 2]\0', "is a list, not an object"),
    (b'[' * 100000 + b'\0', "bad JSON config"),
    (b'{"vtpms": {}}\0', "vtpms is not a list"),
    (b'{"vtpms": [3]}\0', r"vtpms\[0\] is not an object"),
    (b'{"vtpms": [{"uuid": "nope"}]}\0', r"vtpms\[0\].uuid 'nope' is not a UUID"),
    (b'{"vtpms": [{"uuid": 5}]}\0', r"vtpms\[0\].uuid 5 is not a UUID"),
    (b'{"vtpms": [{"backend_domid": 70000}]}\0', "is not a domain id"),
    (b'{"vtpms": [{"backend_domid": true}]}\0', "is not a domain id"),
    (b'{"vtpms": [{"devid": -1}]}\0', "is not a device id"),
    (b'{"vtpms": [{"backend_domname": ""}]}\0', "is not a domain name"),
    (b'', "not NUL-terminated"),
])
def test_bad_config_json(blob, defect):
    with pytest.raises(MalformedSaveFile, match=defect) as exc:
        header_of(raw_header(blob))
    assert "\n" not in str(exc.value)


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_header_parser_never_raises_anything_else(blob):
    for data in (blob, ss.SAVE_MAGIC + blob, ss.xl_header(CONFIG)[:48] + blob):
        try:
            header_of(data)
        except MalformedSaveFile:
            pass


# --- malformed streams ------------------------------------------------------------------

SMALL_MEM = memory_of("random", 3 * PAGE)
SMALL = save_bytes(SMALL_MEM)


def read_small(data: bytes):
    return ss.read_save(io.BytesIO(data), bytearray(len(SMALL_MEM)))


def test_truncation_at_every_record_boundary_and_inside_pages():
    stream_start = read_save_header(io.BytesIO(SMALL)).stream_offset
    for n in list(range(stream_start, stream_start + 200)) + list(range(len(SMALL) - 200, len(SMALL))) + [
            len(SMALL) // 2]:
        with pytest.raises(MalformedSaveFile, match=r"offset \d+: "):
            read_small(SMALL[:n])
    assert read_small(SMALL).pages == 3


@pytest.mark.parametrize("stream,defect", [
    (libxc_prefix() + page_data([0], [b"\0" * PAGE]) + ss.record(ss.LibxcRec.END) + ss.record(ss.LibxlRec.END),
     "without an HVM_CONTEXT"),
    (libxc_prefix() + page_data([3], [b"\0" * PAGE]) + libxc_suffix(), r"pfn 0x3 is beyond the guest's 3 pages"),
    (libxc_prefix() + page_data([0, 1], [b"\0" * PAGE]) + libxc_suffix(), "does not match 2 pfns with 2 data"),
    (libxc_prefix() + page_data([1 << 55], []) + libxc_suffix(), "reserved bits"),
    (libxc_prefix() + page_data([1 << 60 | 1], [b"\0" * PAGE]) + libxc_suffix(), "page type 0x1"),
    (libxc_prefix() + ss.record(ss.LibxcRec.PAGE_DATA, struct.pack("=II", 0, 0) + bytes(8)) + libxc_suffix(),
     "count 0"),
    (libxc_prefix() + ss.record(ss.LibxcRec.SHARED_INFO, bytes(PAGE)) + libxc_suffix(), "not valid in a saved HVM"),
    (libxc_prefix() + ss.record(ss.LibxcRec.STATIC_DATA_END) + libxc_suffix(), "outside the static data"),
    (libxc_prefix() + ss.record(ss.LibxcRec.HVM_CONTEXT, b"\1" * 8) + libxc_suffix(), "HVM_CONTEXT blob"),
    (libxc_prefix() + ss.record(ss.LibxcRec.X86_TSC_INFO, bytes(20)) + libxc_suffix(), "X86_TSC_INFO"),
    (libxc_prefix() + ss.record(ss.LibxcRec.HVM_PARAMS, struct.pack("=II", 2, 0)) + libxc_suffix(),
     "does not match 2 params"),
    (libxc_prefix()[:-8] + page_data([0], [b"\0" * PAGE]) + libxc_suffix(), "PAGE_DATA record before STATIC"),
    (libxc_prefix() + libxc_suffix()[:-8] + ss.record(ss.LibxlRec.CHECKPOINT_END) + ss.record(ss.LibxlRec.END),
     "checkpointed"),
    (libxc_prefix() + libxc_suffix()[:-8] + struct.pack("=II", 0, 8) + bytes(8), "libxl END record with non-zero"),
    (libxc_prefix() + ss.record(ss.LibxcRec.X86_TSC_INFO, b"\0" * 20 + b"\1\0\0\0") + libxc_suffix(),
     "reserved bits"),
    (ss.xl_header(CONFIG) + ss.libxl_header() + ss.record(ss.LibxlRec.END), "without a LIBXC_CONTEXT"),
    (ss.xl_header(CONFIG) + struct.pack("!QII", 0x4C6962786C466D74, 3, 0), "bad libxl stream header"),
    (ss.xl_header(CONFIG) + ss.libxl_header() + ss.record(ss.LibxlRec.LIBXC_CONTEXT)
     + ss.libxc_headers()[:24] + struct.pack("=IHHII", 1, 12, 0, 4, 17), "domain type 1 is not x86 HVM"),
    (ss.xl_header(CONFIG) + ss.libxl_header() + struct.pack("=II", 1, (16 << 20) + 1) + bytes(8), "exceeds"),
])
def test_malformed_records(stream, defect):
    with pytest.raises(MalformedSaveFile, match=defect) as exc:
        read_small(stream)
    assert "\n" not in str(exc.value)


def test_non_zero_padding_is_refused():
    # HVM_PARAMS with 12 content bytes (count 0 plus 4 stray bytes) is padded to 16.
    rec = bytearray(ss.record(ss.LibxcRec.HVM_PARAMS, struct.pack("=II", 0, 0) + bytes(4)))
    assert len(rec) == 8 + 16
    rec[-1] = 1
    with pytest.raises(MalformedSaveFile, match="non-zero padding after HVM_PARAMS"):
        read_small(libxc_prefix() + bytes(rec) + libxc_suffix())


def test_legacy_stream_and_bad_memory_out():
    legacy = patched(SMALL, 36, "=I", 1)
    with pytest.raises(MalformedSaveFile, match="legacy"):
        read_small(legacy)
    with pytest.raises(ValueError, match="writable"):
        ss.read_save(io.BytesIO(SMALL), bytes(3 * PAGE))


@given(st.integers(min_value=0, max_value=len(SMALL) - 1))
@settings(max_examples=200, deadline=None)
def test_any_truncation_is_malformed(n):
    with pytest.raises(MalformedSaveFile):
        read_small(SMALL[:n])


# Most of SMALL is page data, where any byte is valid; aim most edits at the structure.
POSITIONS = st.one_of(st.integers(0, 699), st.integers(len(SMALL) - 200, len(SMALL) - 1),
                      st.integers(0, len(SMALL) - 1))


@given(st.lists(st.tuples(POSITIONS, st.integers(0, 255)), min_size=1, max_size=4),
       st.integers(min_value=0, max_value=len(SMALL)))
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_corruption_is_malformed_or_harmless(edits, cut):
    data = bytearray(SMALL)
    for pos, value in edits:
        data[pos] = value
    try:
        read_small(bytes(data[:cut]) if cut < len(data) else bytes(data))
    except MalformedSaveFile:
        pass


def test_relinking_the_emulator_tpm_rewrites_only_its_socket(tmp_path):
    """A moved guest's stream, its TPM chardev pointed at this host's swtpm socket: the header still
    parses (and Xen's verifier accepts the file), only that chardev's path changed, and the memory
    after the header arrives byte for byte, however the stream was cut into blocks."""
    name = f"{VTPM_UUID}.sock"
    other = ["-chardev", "socket,id=mon,path=/run/other,,odd.sock", "-serial", "chardev:mon"]
    config = dict(CONFIG, b_info=dict(CONFIG["b_info"], extra_hvm=[*tpm_args(Path("/src/run") / name), *other]))
    memory = memory_of("random", 4 * PAGE)
    stream = save_bytes(memory, config)
    for step in (7, 4096, len(stream)):
        moved = b"".join(relink_emulator_tpm((stream[i:i + step] for i in range(0, len(stream), step)),
                                             name, f"/dst/run,x/{name}"))
        header = read_save_header(io.BytesIO(moved))
        assert header.emulator_tpms == [f"/dst/run,x/{name}"]
        assert header.config["b_info"]["extra_hvm"][len(tpm_args(Path(name))):] == other
        assert moved[header.stream_offset:] == stream[read_save_header(io.BytesIO(stream)).stream_offset:]
    path = tmp_path / "moved.sav"
    path.write_bytes(moved)
    assert verify(path).returncode == 0
    mem = bytearray(4 * PAGE)
    ss.read_save(io.BytesIO(moved), mem)
    assert mem == memory
