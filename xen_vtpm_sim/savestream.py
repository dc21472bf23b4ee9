"""Real xl save files for the simulated host: write and read an HVM guest's save image.

Layout (docs/savefile.md): xl header + JSON config (xen_vtpm.xen.savefile), then the libxl
migration stream v2 (docs/specs/libxl-migration-stream.pandoc) whose LIBXC_CONTEXT
record is followed by a libxc stream v3 (docs/specs/libxc-migration-stream.pandoc)
of an x86 HVM guest.  Xen's `verify-stream-v2 -f xl` accepts what write_save writes.

Both directions stream: no seeking, so either end may be a fifo, and memory use is
bounded by one batch of pages whatever the guest size.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import mmap
import os
import struct
from array import array
from typing import BinaryIO

from xen_vtpm.errors import MalformedSaveFile
from xen_vtpm.xen.savefile import (
    BYTEORDER_VALUE,
    FLAG_JSON,
    FLAG_STREAMV2,
    HEADER,
    SAVE_MAGIC,
    U32,
    SaveHeader,
    read_exactly,
    read_save_header,
    source_name,
)

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
BATCH_PAGES = 1024            # libxc's MAX_BATCH_SIZE
REC_LENGTH_MAX = 128 << 20    # libxc refuses longer records
SMALL_RECORD_MAX = 16 << 20   # any record that is not PAGE_DATA is read whole; cap it
XEN_VERSION = (4, 17)
GUEST_TSC_KHZ = 2_000_000

RECORD_HDR = struct.Struct("=II")          # type, length (content is padded to 8 bytes)
LIBXL_HDR = struct.Struct("!QII")          # ident, version, options (big-endian, as specified)
LIBXL_IDENT = 0x4C6962786C466D74           # "LibxlFmt"
LIBXC_IHDR = struct.Struct("!QIIHHI")      # marker, ident, version, options, reserved, reserved
LIBXC_MARKER = 0xFFFFFFFFFFFFFFFF
LIBXC_IDENT = 0x58454E46                   # "XENF"
LIBXC_VERSION = 3
LIBXC_DHDR = struct.Struct("=IHHII")       # type, page_shift, reserved, xen major, xen minor
DOMAIN_TYPE_HVM = 2
COUNT_HDR = struct.Struct("=II")           # PAGE_DATA / HVM_PARAMS: count, reserved
TSC_INFO = struct.Struct("=IIQII")         # mode, khz, nsec, incarnation, reserved
HVM_PARAM = struct.Struct("=QQ")           # index, value
HVM_DESC = struct.Struct("=HHI")           # hvm save record: typecode, instance, length
HVM_SAVE_HEADER = struct.Struct("=IIQII")  # magic, version, changeset, cpuid, gtsc_khz
HVM_FILE_MAGIC = 0x54381286

PFN_MASK = (1 << 52) - 1
PFN_RESERVED = ((1 << 60) - 1) & ~PFN_MASK
TYPE_SHIFT = 60
TYPE_NOTAB, TYPE_BROKEN, TYPE_XALLOC, TYPE_XTAB = 0x0, 0xD, 0xE, 0xF

Buffer = bytes | bytearray | memoryview | mmap.mmap

# HVM params libxc saves, at the pfns libxc's domain builder gives HVM special pages.
HVM_PARAMS = {1: 0xFEFFC,   # STORE_PFN
              5: 0xFEFFD,   # IOREQ_PFN
              6: 0xFEFFB,   # BUFIOREQ_PFN
              17: 0xFEFFF}  # CONSOLE_PFN


class LibxlRec(enum.IntEnum):
    END = 0
    LIBXC_CONTEXT = 1
    EMULATOR_XENSTORE_DATA = 2
    EMULATOR_CONTEXT = 3
    CHECKPOINT_END = 4
    CHECKPOINT_STATE = 5


class LibxcRec(enum.IntEnum):
    END = 0x00
    PAGE_DATA = 0x01
    X86_PV_INFO = 0x02
    X86_PV_P2M_FRAMES = 0x03
    X86_PV_VCPU_BASIC = 0x04
    X86_PV_VCPU_EXTENDED = 0x05
    X86_PV_VCPU_XSAVE = 0x06
    SHARED_INFO = 0x07
    X86_TSC_INFO = 0x08
    HVM_CONTEXT = 0x09
    HVM_PARAMS = 0x0A
    TOOLSTACK = 0x0B
    X86_PV_VCPU_MSRS = 0x0C
    VERIFY = 0x0D
    CHECKPOINT = 0x0E
    CHECKPOINT_DIRTY_PFN_LIST = 0x0F
    STATIC_DATA_END = 0x10
    X86_CPUID_POLICY = 0x11
    X86_MSR_POLICY = 0x12


# --- writing ------------------------------------------------------------------

def record(rtype: int, body: bytes = b"") -> bytes:
    return RECORD_HDR.pack(rtype, len(body)) + body + bytes(-len(body) % 8)


def xl_header(config: dict) -> bytes:
    """What `xl save` writes before the stream: header, then u32 config_len + JSON + NUL."""
    blob = json.dumps(config, indent=4).encode() + b"\0"
    optional = U32.pack(len(blob)) + blob
    return HEADER.pack(SAVE_MAGIC, BYTEORDER_VALUE, FLAG_JSON | FLAG_STREAMV2, 0, len(optional)) + optional


def libxl_header() -> bytes:
    return LIBXL_HDR.pack(LIBXL_IDENT, 2, 0)  # options 0: little-endian, not converted from legacy


def libxc_headers() -> bytes:
    return (LIBXC_IHDR.pack(LIBXC_MARKER, LIBXC_IDENT, LIBXC_VERSION, 0, 0, 0)
            + LIBXC_DHDR.pack(DOMAIN_TYPE_HVM, PAGE_SHIFT, 0, *XEN_VERSION))


def tsc_info_record() -> bytes:
    return record(LibxcRec.X86_TSC_INFO, TSC_INFO.pack(0, GUEST_TSC_KHZ, 0, 0, 0))


def hvm_context_record() -> bytes:
    """Xen's HVM save blob reduced to its header and END: the simulated vCPU has no registers."""
    blob = (HVM_DESC.pack(1, 0, HVM_SAVE_HEADER.size)
            + HVM_SAVE_HEADER.pack(HVM_FILE_MAGIC, 1, 0, 0, GUEST_TSC_KHZ)
            + HVM_DESC.pack(0, 0, 0))
    return record(LibxcRec.HVM_CONTEXT, blob)


def hvm_params_record(params: dict[int, int]) -> bytes:
    body = COUNT_HDR.pack(len(params), 0) + b"".join(HVM_PARAM.pack(i, v) for i, v in sorted(params.items()))
    return record(LibxcRec.HVM_PARAMS, body)


def page_data_header(first_pfn: int, count: int) -> bytes:
    """Record header, count and pfn list of a PAGE_DATA record whose count pages follow."""
    length = COUNT_HDR.size + 8 * count + PAGE_SIZE * count  # always a multiple of 8: no padding
    return (RECORD_HDR.pack(LibxcRec.PAGE_DATA, length) + COUNT_HDR.pack(count, 0)
            + array("Q", range(first_pfn, first_pfn + count)).tobytes())


class _Sink:
    """Gathered writes: one writev per PAGE_DATA record straight from guest memory."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        try:
            out.flush()
            self.fd = out.fileno()
        except (AttributeError, OSError, ValueError):
            self.fd = None  # BytesIO and other objects without a descriptor

    def write(self, *parts: bytes | memoryview) -> None:
        if self.fd is None:
            for part in parts:
                self.out.write(part)
            return
        views = [memoryview(p) for p in parts]
        try:
            while views:
                done = os.writev(self.fd, views)
                while views and done >= len(views[0]):
                    done -= len(views[0])
                    views.pop(0).release()
                if views:
                    rest = views[0][done:]  # short write (signal, full pipe)
                    views[0].release()
                    views[0] = rest
        finally:
            # A view left alive in a traceback would stop the caller from closing its mmap.
            for view in views:
                view.release()


EMULATOR_QEMU_UPSTREAM = 2
EMULATOR_HDR = struct.Struct("=II")        # emulator id, index (libxl_sr_stream_format.h)


def write_save(out: BinaryIO, config: dict, memory: Buffer, *, domid: int,
               emulator_context: bytes | None = None) -> None:
    """Write an xl save file of HVM domain `domid`: config JSON plus all of `memory`.

    `memory` is any buffer (bytes, bytearray, mmap) whose length is a multiple of
    4096; page N of it is guest pfn N.  `out` may be a fifo.  `emulator_context` is the
    device model's state file (qemu-save.<domid>), which libxl writes after the libxc stream
    as an EMULATOR_CONTEXT record of QEMU upstream (libxl_stream_write.c).
    """
    with memoryview(memory) as raw, raw.cast("B") as mem:
        if len(mem) % PAGE_SIZE:
            raise ValueError(f"domain {domid}: memory size {len(mem)} is not a multiple of {PAGE_SIZE}")
        sink = _Sink(out)
        sink.write(xl_header(config) + libxl_header() + record(LibxlRec.LIBXC_CONTEXT)
                   + libxc_headers() + record(LibxcRec.STATIC_DATA_END) + tsc_info_record())
        pages = len(mem) // PAGE_SIZE
        for pfn in range(0, pages, BATCH_PAGES):
            count = min(BATCH_PAGES, pages - pfn)
            with mem[pfn * PAGE_SIZE:(pfn + count) * PAGE_SIZE] as pages_view:
                sink.write(page_data_header(pfn, count), pages_view)
        emulator = b"" if emulator_context is None else record(
            LibxlRec.EMULATOR_CONTEXT, EMULATOR_HDR.pack(EMULATOR_QEMU_UPSTREAM, 0) + emulator_context)
        sink.write(hvm_context_record() + hvm_params_record(HVM_PARAMS)
                   + record(LibxcRec.END) + emulator + record(LibxlRec.END))
    if sink.fd is None and hasattr(out, "flush"):
        out.flush()


# --- reading ------------------------------------------------------------------

@dataclasses.dataclass
class SaveInfo:
    header: SaveHeader
    libxc_version: int
    pages: int                  # pages written into memory_out
    hvm_params: dict[int, int]
    tsc_khz: int | None
    emulator_context: bytes | None = None   # the device model's state (EMULATOR_CONTEXT body, sub-header off)


class _Reader:
    """Sequential reads with the offset every error message names."""

    def __init__(self, inp: BinaryIO, name: str, pos: int) -> None:
        self.inp, self.name, self.pos = inp, name, pos

    def bad(self, defect: str, at: int | None = None) -> MalformedSaveFile:
        return MalformedSaveFile(f"{self.name}: offset {self.pos if at is None else at}: {defect}; "
                                 "the save stream is damaged or incomplete, use another copy")

    def exact(self, n: int, what: str) -> bytes:
        data = read_exactly(self.inp, n)
        self.pos += len(data)
        if len(data) < n:
            raise self.bad(f"truncated inside {what} ({n - len(data)} of {n} bytes missing)")
        return data

    def into(self, mem: memoryview, start: int, end: int, what: str) -> None:
        """Fill mem[start:end] from the stream; no view of mem outlives the call, even on error."""
        while start < end:
            with mem[start:end] as view:
                n = self.inp.readinto(view)
            if not n:
                raise self.bad(f"truncated inside {what} ({end - start} bytes missing)")
            start += n
            self.pos += n

    def padding(self, length: int, what: str) -> None:
        at = self.pos
        if any(self.exact(-length % 8, f"{what} padding")):
            raise self.bad(f"non-zero padding after {what}", at)

    def record_header(self, kinds: type[enum.IntEnum], stream: str) -> tuple[enum.IntEnum, int, int]:
        at = self.pos
        rtype, length = RECORD_HDR.unpack(self.exact(RECORD_HDR.size, f"{stream} record header"))
        try:
            kind = kinds(rtype)
        except ValueError:
            raise self.bad(f"unknown {stream} record type 0x{rtype:x}", at) from None
        limit = REC_LENGTH_MAX if kind is LibxcRec.PAGE_DATA else SMALL_RECORD_MAX
        if length > limit:
            raise self.bad(f"{stream} {kind.name} record length {length} exceeds {limit}", at)
        return kind, length, at

    def body(self, kind: enum.IntEnum, length: int) -> bytes:
        data = self.exact(length, f"{kind.name} record")
        self.padding(length, f"{kind.name} record")
        return data


def read_save(inp: BinaryIO, memory_out: bytearray | memoryview | mmap.mmap) -> SaveInfo:
    """Parse an xl save stream and write its pages into `memory_out` (pfn N at N*4096).

    Raises MalformedSaveFile naming the offset and the defect; never seeks.
    """
    header = read_save_header(inp)
    r = _Reader(inp, source_name(inp), header.stream_offset)
    if not header.mandatory_flags & FLAG_STREAMV2:
        raise r.bad("legacy (pre-v2) migration stream; only stream v2 is supported", 36)
    ident, version, options = LIBXL_HDR.unpack(r.exact(LIBXL_HDR.size, "libxl header"))
    if ident != LIBXL_IDENT or version != 2:
        raise r.bad(f"bad libxl stream header (ident 0x{ident:x}, version {version})", r.pos - LIBXL_HDR.size)
    if options:
        raise r.bad(f"unsupported libxl stream options 0x{options:x} (big-endian or legacy)", r.pos - 4)
    with memoryview(memory_out) as raw, raw.cast("B") as mem:
        if mem.readonly or len(mem) % PAGE_SIZE:
            raise ValueError("memory_out must be a writable buffer of whole 4096-byte pages")
        info = None
        while True:
            kind, length, at = r.record_header(LibxlRec, "libxl")
            if kind is LibxlRec.LIBXC_CONTEXT:
                if info is not None or length:
                    raise r.bad("second or non-empty LIBXC_CONTEXT record", at)
                info = _read_libxc(r, mem, header)
            elif kind in (LibxlRec.EMULATOR_XENSTORE_DATA, LibxlRec.EMULATOR_CONTEXT):
                body = r.body(kind, length)
                if len(body) < 8 or COUNT_HDR.unpack_from(body)[0] > 2:
                    raise r.bad(f"{kind.name} record without a valid emulator id", at)
                if kind is LibxlRec.EMULATOR_CONTEXT:
                    if info is None:
                        raise r.bad("EMULATOR_CONTEXT record before the LIBXC_CONTEXT record", at)
                    info.emulator_context = body[EMULATOR_HDR.size:]
            elif kind is LibxlRec.END:
                if length:
                    raise r.bad("libxl END record with non-zero length", at)
                if info is None:
                    raise r.bad("libxl stream ends without a LIBXC_CONTEXT record", at)
                return info
            else:
                raise r.bad(f"{kind.name} record: checkpointed (Remus/COLO) stream, not a saved domain", at)


def _read_libxc(r: _Reader, mem: memoryview, header: SaveHeader) -> SaveInfo:
    at = r.pos
    marker, ident, version, options, res1, res2 = LIBXC_IHDR.unpack(r.exact(LIBXC_IHDR.size, "libxc image header"))
    if marker != LIBXC_MARKER or ident != LIBXC_IDENT:
        raise r.bad("bad libxc image header marker or ident", at)
    if version not in (2, 3) or options or res1 or res2:
        raise r.bad(f"unsupported libxc image header (version {version}, options 0x{options:x})", at)
    at = r.pos
    gtype, page_shift, res, _, _ = LIBXC_DHDR.unpack(r.exact(LIBXC_DHDR.size, "libxc domain header"))
    if gtype != DOMAIN_TYPE_HVM:
        raise r.bad(f"domain type {gtype} is not x86 HVM", at)
    if page_shift != PAGE_SHIFT or res:
        raise r.bad(f"bad libxc domain header (page shift {page_shift})", at)
    info = SaveInfo(header=header, libxc_version=version, pages=0, hvm_params={}, tsc_khz=None)
    static_done = version == 2  # v2 streams have no static data section
    hvm_context = False
    while True:
        kind, length, at = r.record_header(LibxcRec, "libxc")
        if kind in (LibxcRec.X86_CPUID_POLICY, LibxcRec.X86_MSR_POLICY, LibxcRec.STATIC_DATA_END):
            if static_done:
                raise r.bad(f"{kind.name} record outside the static data of a v3 stream", at)
            body = r.body(kind, length)
            entry = {LibxcRec.X86_CPUID_POLICY: 24, LibxcRec.X86_MSR_POLICY: 16}.get(kind)
            if (entry is None and body) or (entry and (not body or len(body) % entry)):
                raise r.bad(f"{kind.name} record has bad length {length}", at)
            static_done = kind is LibxcRec.STATIC_DATA_END
            continue
        if not static_done:
            raise r.bad(f"{kind.name} record before STATIC_DATA_END", at)
        if kind is LibxcRec.PAGE_DATA:
            info.pages += _read_page_data(r, mem, length, at)
        elif kind is LibxcRec.X86_TSC_INFO:
            body = r.body(kind, length)
            if len(body) != TSC_INFO.size or TSC_INFO.unpack(body)[4]:
                raise r.bad(f"X86_TSC_INFO record has bad length {length} or reserved bits", at)
            info.tsc_khz = TSC_INFO.unpack(body)[1]
        elif kind is LibxcRec.HVM_CONTEXT:
            _check_hvm_context(r, r.body(kind, length), at)
            hvm_context = True
        elif kind is LibxcRec.HVM_PARAMS:
            info.hvm_params = _parse_hvm_params(r, r.body(kind, length), at)
        elif kind is LibxcRec.END:
            if length:
                raise r.bad("libxc END record with non-zero length", at)
            if not hvm_context:
                raise r.bad("libxc stream ends without an HVM_CONTEXT record", at)
            return info
        else:
            raise r.bad(f"{kind.name} record is not valid in a saved HVM guest", at)


def _check_hvm_context(r: _Reader, blob: bytes, at: int) -> None:
    """Walk Xen's HVM save records: each must fit, and the last must be END (typecode 0)."""
    off = 0
    while off + HVM_DESC.size <= len(blob):
        typecode, _, length = HVM_DESC.unpack_from(blob, off)
        off += HVM_DESC.size + length
        if typecode == 0:
            if length == 0 and off == len(blob):
                return
            break
    raise r.bad("HVM_CONTEXT blob is not a sequence of HVM save records ending in END", at)


def _parse_hvm_params(r: _Reader, body: bytes, at: int) -> dict[int, int]:
    if len(body) < COUNT_HDR.size:
        raise r.bad("HVM_PARAMS record shorter than its header", at)
    count, res = COUNT_HDR.unpack_from(body)
    if res or len(body) != COUNT_HDR.size + count * HVM_PARAM.size:
        raise r.bad(f"HVM_PARAMS record length {len(body)} does not match {count} params", at)
    return dict(HVM_PARAM.iter_unpack(body[COUNT_HDR.size:]))


def _read_page_data(r: _Reader, mem: memoryview, length: int, at: int) -> int:
    if length <= COUNT_HDR.size:
        raise r.bad(f"PAGE_DATA record of {length} bytes has no pfns", at)
    count, res = COUNT_HDR.unpack(r.exact(COUNT_HDR.size, "PAGE_DATA header"))
    if count == 0 or res or COUNT_HDR.size + 8 * count > length:
        raise r.bad(f"PAGE_DATA header count {count} does not fit record length {length}", at)
    pfns = array("Q")
    pfns.frombytes(r.exact(8 * count, "PAGE_DATA pfn list"))
    npages = len(mem) // PAGE_SIZE
    first = pfns[0]
    # Fast path, what write_save emits: one run of consecutive ordinary pages.
    if first + count <= npages and pfns == array("Q", range(first, first + count)):
        data_pfns = None
        ndata = count
    else:
        data_pfns = _data_pfns(r, pfns, npages, at)
        ndata = len(data_pfns)
    if length != COUNT_HDR.size + 8 * count + PAGE_SIZE * ndata:
        raise r.bad(f"PAGE_DATA record length {length} does not match {count} pfns with {ndata} data pages", at)
    if data_pfns is None:
        r.into(mem, first * PAGE_SIZE, (first + count) * PAGE_SIZE, "PAGE_DATA pages")
    else:
        for pfn in data_pfns:
            r.into(mem, pfn * PAGE_SIZE, (pfn + 1) * PAGE_SIZE, "PAGE_DATA pages")
    r.padding(length, "PAGE_DATA record")
    return ndata


def _data_pfns(r: _Reader, pfns: array, npages: int, at: int) -> list[int]:
    """Pfns that carry data; holes (XTAB), allocate-only and broken pages carry none."""
    out = []
    for i, entry in enumerate(pfns):
        ptype, pfn = entry >> TYPE_SHIFT, entry & PFN_MASK
        if entry & PFN_RESERVED:
            raise r.bad(f"PAGE_DATA pfn[{i}] 0x{entry:016x} has reserved bits set", at)
        if ptype in (TYPE_XTAB, TYPE_XALLOC, TYPE_BROKEN):
            continue
        if ptype != TYPE_NOTAB:
            raise r.bad(f"PAGE_DATA pfn[{i}] has page type 0x{ptype:x}, not valid for an HVM guest", at)
        if pfn >= npages:
            raise r.bad(f"PAGE_DATA pfn 0x{pfn:x} is beyond the guest's {npages} pages", at)
        out.append(pfn)
    return out
