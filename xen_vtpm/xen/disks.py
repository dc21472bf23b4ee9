"""A running domain's disks as the toolstack set them up: its vbd backends (docs/xen-internals.md §5.6).

libxl writes each disk's backend (``params``, ``type``, ``mode``) under dom0's ``backend/vbd`` (blkback,
``type`` = ``phy``) or ``backend/qdisk`` (QEMU, ``params`` = ``<format>:<path>``) and a copy under
``/libxl/<domid>/device/vbd/<devid>``; the copy is dom0's alone, so that is what is read here (the
frontend directory belongs to the domain, which could point it anywhere).
"""
from __future__ import annotations

import dataclasses

from xen_vtpm.errors import XenStoreNotFound

from .xenstore import XenStore


@dataclasses.dataclass(frozen=True)
class Vbd:
    devid: int
    vdev: str             # hda, xvda, ...
    backend_type: str     # "phy" (blkback: a block device, or a regular file through a loop device) or "qdisk"
    format: str           # "raw" for phy; qdisk's params prefix otherwise
    path: str             # the image or device the backend serves
    writable: bool


def vbds(xs: XenStore, domid: int) -> list[Vbd]:
    """The domain's disks, lowest device number first (a stub domain's ``hda`` is its first)."""
    base = f"/libxl/{domid}/device/vbd"
    try:
        devids = sorted(int(d) for d in xs.ls(base) if d.isdigit())
    except XenStoreNotFound:
        return []
    out = []
    for devid in devids:
        node = f"{base}/{devid}"
        btype = xs.read_or(f"{node}/type") or ""
        params = xs.read_or(f"{node}/params") or ""
        fmt, path = ("raw", params)
        if btype == "qdisk":
            fmt, _, path = params.partition(":")
        out.append(Vbd(devid=devid, vdev=xs.read_or(f"{node}/dev") or "", backend_type=btype, format=fmt or "raw",
                       path=path, writable=xs.read_or(f"{node}/mode") == "w"))
    return out
