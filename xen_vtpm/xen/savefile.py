"""The header of an `xl save` file: magic, flags, and the domain's JSON config (its vTPMs included:
Xen vtpm devices, and emulator TPMs in the device model's arguments).

Layout (`tools/xl/xl.h`, `xl_saverestore.c`, read back in `xl_vmcontrol.c`; see docs/savefile.md):
``magic[32] | u32 byteorder | u32 mandatory_flags | u32 optional_flags |
u32 optional_data_len | optional data = u32 config_len + JSON config (NUL-terminated)``,
all integers in host byte order, followed by the libxl migration stream v2.
"""
from __future__ import annotations

import io
import json
import os
import struct
import uuid as uuidlib
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from xen_vtpm.errors import MalformedSaveFile
from xen_vtpm.model import SaveHeader

from .devicemodel import emulator_sockets, rewire_socket

__all__ = ["SaveHeader", "read_save_header", "relink_emulator_tpm"]

SAVE_MAGIC = b"Xen saved domain, xl format\n \0 \r"
BYTEORDER_VALUE = 0x01020304
FLAG_JSON = 1
FLAG_STREAMV2 = 2
FLAGS_KNOWN = FLAG_JSON | FLAG_STREAMV2
HEADER = struct.Struct("=32sIIII")
U32 = struct.Struct("=I")
# libxl's JSON of a whole domain config is a few KiB; anything near this is not a config.
MAX_CONFIG_LEN = 16 << 20
MAX_DOMID = 0x7FEF  # DOMID_FIRST_RESERVED - 1

_NEXT = "check the file or use another copy written by `xl save`"


def source_name(src: object) -> str:
    name = getattr(src, "name", None)
    return name if isinstance(name, str) else "<save stream>"


def read_exactly(inp: BinaryIO, n: int) -> bytes:
    """Read n bytes or fewer only at end of stream; pipes and raw files return short reads."""
    parts = []
    while n > 0:
        chunk = inp.read(n)
        if not chunk:
            break
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def read_save_header(src: str | os.PathLike | BinaryIO) -> SaveHeader:
    """Parse the xl header and JSON config; leave a file object positioned at the stream.

    Never seeks, so `src` may be a fifo; raises MalformedSaveFile on any defect.
    """
    if isinstance(src, (str, os.PathLike)):
        try:
            with open(src, "rb") as fh:
                return _parse_header(fh, os.fspath(src))
        except OSError as exc:
            raise MalformedSaveFile(f"{os.fspath(src)}: cannot read save file ({exc.strerror}); "
                                    "check the path and permissions") from None
    return _parse_header(src, source_name(src))


def _parse_header(inp: BinaryIO, name: str) -> SaveHeader:
    def bad(offset: int, defect: str) -> MalformedSaveFile:
        return MalformedSaveFile(f"{name}: offset {offset}: {defect}; {_NEXT}")

    raw = read_exactly(inp, HEADER.size)
    if not raw:
        raise bad(0, "empty, not an xl save file")
    if raw[:len(SAVE_MAGIC)] != SAVE_MAGIC[:len(raw)]:
        raise bad(0, "wrong magic, not an xl save file")
    if len(raw) < HEADER.size:
        raise bad(len(raw), f"truncated inside the {HEADER.size}-byte xl header")
    _, byteorder, mandatory, optional, optlen = HEADER.unpack(raw)
    if byteorder != BYTEORDER_VALUE:
        hint = " (written on a host of the other endianness)" if byteorder == 0x04030201 else ""
        raise bad(32, f"wrong byte-order mark 0x{byteorder:08x}{hint}")
    if mandatory & ~FLAGS_KNOWN:
        raise bad(36, f"unsupported mandatory flags 0x{mandatory & ~FLAGS_KNOWN:x} (needs a newer xl)")
    if not mandatory & FLAG_JSON:
        raise bad(36, "no JSON domain config (JSON flag clear: legacy xl save file)")
    if optlen > MAX_CONFIG_LEN + U32.size:
        raise bad(44, f"optional data length {optlen} exceeds the {MAX_CONFIG_LEN >> 20} MiB limit")
    base = HEADER.size
    opt = read_exactly(inp, optlen)
    if len(opt) < optlen:
        raise bad(base + len(opt), f"truncated inside the {optlen}-byte optional data")
    if optlen < U32.size:
        raise bad(base, f"optional data of {optlen} bytes has no config length")
    (config_len,) = U32.unpack_from(opt)
    if config_len > optlen - U32.size:
        raise bad(base, f"config length {config_len} exceeds the optional data ({optlen - U32.size} bytes left)")
    config = _parse_config(opt[U32.size:U32.size + config_len], base + U32.size, bad)
    return SaveHeader(mandatory_flags=mandatory, optional_flags=optional, config=config,
                      vtpms=_vtpms(config, base + U32.size, bad), stream_offset=base + optlen,
                      emulator_tpms=_emulator_tpms(config))


def _parse_config(data: bytes, offset: int, bad) -> dict:
    # xl stores strlen()+1 bytes and hands the buffer to libxl as a C string.
    if not data or data[-1] != 0:
        raise bad(offset, "JSON config is not NUL-terminated")
    if 0 in data[:-1]:
        raise bad(offset + data.index(0), "NUL byte inside the JSON config")
    try:
        config = json.loads(data[:-1].decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise bad(offset + exc.start, "JSON config is not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise bad(offset + exc.pos, f"bad JSON config ({exc.msg})") from None
    except (ValueError, RecursionError) as exc:
        raise bad(offset, f"bad JSON config ({exc.__class__.__name__})") from None
    if not isinstance(config, dict):
        raise bad(offset, f"JSON config is a {type(config).__name__}, not an object")
    return config


def _vtpms(config: dict, offset: int, bad) -> list[dict]:
    """Normalise `vtpms`: libxl's JSON generator omits fields that hold their default."""
    entries = config.get("vtpms", [])
    if not isinstance(entries, list):
        raise bad(offset, "config field vtpms is not a list")
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise bad(offset, f"vtpms[{i}] is not an object")
        domid = entry.get("backend_domid", 0)
        devid = entry.get("devid", 0)
        domname = entry.get("backend_domname")
        uid = entry.get("uuid")
        if type(domid) is not int or not 0 <= domid <= MAX_DOMID:
            raise bad(offset, f"vtpms[{i}].backend_domid {domid!r} is not a domain id")
        if type(devid) is not int or devid < 0:
            raise bad(offset, f"vtpms[{i}].devid {devid!r} is not a device id")
        if domname is not None and (not isinstance(domname, str) or not domname):
            raise bad(offset, f"vtpms[{i}].backend_domname {domname!r} is not a domain name")
        if uid is not None:
            try:
                uid = str(uuidlib.UUID(uid)) if isinstance(uid, str) else None
            except ValueError:
                uid = None
            if uid is None:
                raise bad(offset, f"vtpms[{i}].uuid {entry.get('uuid')!r} is not a UUID")
        out.append({"uuid": uid, "backend_domname": domname, "backend_domid": domid, "devid": devid})
    return out


def _emulator_tpms(config: dict) -> list[str]:
    """swtpm sockets of the emulator TPMs its `device_model_args_hvm` (b_info.extra_hvm) wires."""
    b_info = config.get("b_info")
    extra = b_info.get("extra_hvm") if isinstance(b_info, dict) else None
    if not isinstance(extra, list) or not all(isinstance(a, str) for a in extra):
        return []
    return emulator_sockets(extra)


def relink_emulator_tpm(blocks: Iterable[bytes | memoryview], socket_name: str,
                        socket: str) -> Iterator[bytes | memoryview]:
    """A save stream whose config wires its device model's TPM to ``socket`` instead of the swtpm
    socket named ``socket_name`` it had (another host's run directory); the rest byte for byte.

    What `xl restore` does with the config it finds in the header (the optional data's length
    changes with it: xl reads the header by its lengths, libxl the stream after it)."""
    it = iter(blocks)
    buf = bytearray()
    need = HEADER.size
    while len(buf) < need:
        block = next(it, None)
        if block is None:
            break
        buf += block
        if need == HEADER.size and len(buf) >= HEADER.size:
            need += HEADER.unpack_from(buf)[4]
    header = _parse_header(io.BytesIO(bytes(buf[:need])), "the moved guest's save stream")
    magic, byteorder, mandatory, optional, optlen = HEADER.unpack_from(buf)
    (config_len,) = U32.unpack_from(buf, HEADER.size)
    config = header.config
    b_info = config.get("b_info")
    extra = b_info.get("extra_hvm") if isinstance(b_info, dict) else None
    if isinstance(extra, list) and all(isinstance(a, str) for a in extra):
        assert isinstance(b_info, dict)
        b_info["extra_hvm"] = rewire_socket(extra, socket_name, socket)
    text = json.dumps(config).encode() + b"\0"
    rest = bytes(buf[HEADER.size + U32.size + config_len:need])      # optional data after the config
    yield HEADER.pack(magic, byteorder, mandatory, optional, U32.size + len(text) + len(rest)) + U32.pack(len(text)) \
        + text + rest
    if len(buf) > need:
        yield bytes(buf[need:])
    yield from it


# --- running xl -------------------------------------------------------------
