"""The other hosts this one trusts for moves: `xen-vtpm trust add|list|remove`.

A destination refuses a source whose host key is not here, and a source refuses to send to a
destination whose keys are not here: a move always goes between two hosts whose administrators
exchanged `xen-vtpm host-key` files.  Each entry is ``state_dir/peers/<name>.json``, MAC'd with a
sub-key of the sealed host key, so an entry written without that key is refused; every change is
in the audit log, anchored to the TPM counter.
"""
from __future__ import annotations

import datetime
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

from xen_vtpm.config import Config
from xen_vtpm.durable import make_dirs, write_atomic
from xen_vtpm.errors import IntegrityError, NotFound, PreconditionFailed, StorageError
from xen_vtpm.transfer.peer import HostKey, TrustedPeer, check_name

from .session import open_host, tpm_session

PEERS = Path("peers")


class TrustStore:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.host = open_host(cfg)
        self.dir = Path(cfg.state_dir) / PEERS

    def _mac(self, body: dict[str, Any]) -> str:
        text = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        return hmac.new(self.host.keys.trust_mac, text, hashlib.sha256).hexdigest()

    def _load(self, path: Path) -> TrustedPeer:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            mac = doc.pop("mac")
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
            raise IntegrityError(f"{path}: trusted peer entry unreadable ({exc.__class__.__name__}); remove it and "
                                 "trust the host again") from None
        if not hmac.compare_digest(str(mac), self._mac(doc)):
            raise IntegrityError(f"{path}: trusted peer entry fails its MAC (written without this host's key); "
                                 "remove it and trust the host again with `xen-vtpm trust add`")
        return TrustedPeer(name=doc["name"], key=HostKey.from_doc(doc["key"], str(path)),
                           bind_pcrs=bool(doc["bind_pcrs"]), added=doc["added"])

    def list(self) -> list[TrustedPeer]:
        if not self.dir.is_dir():
            return []
        return [self._load(p) for p in sorted(self.dir.glob("*.json"))]

    def by_sign_key(self, sign_key: bytes) -> TrustedPeer | None:
        return next((p for p in self.list() if hmac.compare_digest(p.key.sign_key, sign_key)), None)

    def add(self, name: str, key: HostKey, *, bind_pcrs: bool, own: HostKey) -> TrustedPeer:
        """``own``: this host's key (trusting oneself is a mistake worth stopping)."""
        check_name(name)
        if key.sign_key == own.sign_key:
            raise PreconditionFailed(f"trust add {name}: that is this host's own key; trust the other host's "
                                     "`xen-vtpm host-key`")
        for peer in self.list():
            if peer.name == name:
                raise PreconditionFailed(f"trust add {name}: a peer of that name exists; "
                                         f"`xen-vtpm trust remove {name}` first")
            if peer.key.sign_key == key.sign_key:
                raise PreconditionFailed(f"trust add {name}: that host key is already trusted as {peer.name}")
        peer = TrustedPeer(name=name, key=key, bind_pcrs=bind_pcrs,
                           added=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
        body = {"name": name, "key": key.to_doc(), "bind_pcrs": bind_pcrs, "added": peer.added}
        make_dirs(self.dir, 0o700)
        with tpm_session(self.cfg):
            self.host.audit("trust add", result="ok", detail=f"{name} {key.fingerprint}"
                            + (" pcrs bound" if bind_pcrs else ""))
            write_atomic(self.dir / f"{name}.json", json.dumps({**body, "mac": self._mac(body)}).encode(), mode=0o600)
            self.host.advance()
        return peer

    def remove(self, name: str) -> TrustedPeer:
        check_name(name)
        path = self.dir / f"{name}.json"
        if not path.exists():
            raise NotFound(f"trust remove {name}: no trusted peer of that name; see `xen-vtpm trust list`")
        peer = self._load(path)
        with tpm_session(self.cfg):
            self.host.audit("trust remove", result="ok", detail=f"{name} {peer.key.fingerprint}")
            try:
                path.unlink()
            except OSError as exc:
                raise StorageError(f"{path}: cannot remove ({exc.strerror}); check the state dir") from None
            self.host.advance()
        return peer
