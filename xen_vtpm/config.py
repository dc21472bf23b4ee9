"""The tool's configuration: one INI file, every key with a default.

Lookup order for the file: ``--config``, then ``$XEN_VTPM_CONFIG``, then
``/etc/xen-vtpm/xen-vtpm.conf``.  A missing file means "all defaults", so a
real dom0 needs no config until ``xen-vtpm init`` writes one.
"""
from __future__ import annotations

import configparser
import dataclasses
import io
import os
from pathlib import Path

from .durable import make_dirs, write_atomic
from .errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/xen-vtpm/xen-vtpm.conf")
SECTION = "xen-vtpm"

# Boot-chain PCRs in the SHA-256 bank: firmware (0), option ROMs (2), boot
# loader (4) and Secure Boot policy (7).  Sealing to these means a changed boot
# chain cannot unseal the host key, while ordinary runtime extends of 8+ by the
# OS do not lock the admin out.
DEFAULT_PCRS = "sha256:0,2,4,7"


@dataclasses.dataclass
class Config:
    path: Path | None = None
    state_dir: Path = Path("/var/lib/xen-vtpm")
    xl: str = "xl"
    xenstore_path: str = ""          # empty: $XENSTORED_PATH or the Xen default
    xenstore_timeout: float = 10.0
    tcti: str = "device:/dev/tpmrm0"
    pcrs: str = DEFAULT_PCRS
    primary_handle: int = 0          # 0: create the primary from the fixed template
    counter_index: int = 0x01500016
    manager: str = "vtpmmgr"         # name of the vTPM manager domain
    manager_timeout: float = 30.0
    # `xenconsoled --log=guest` writes guest-<name>.log to its --log-dir, /var/log/xen/console by default.
    log_dir: Path = Path("/var/log/xen/console")
    # Where the xl cfg files of the vTPM stub domains live (<name>.cfg): a rollback has to
    # re-create a vTPM stub domain exactly as the administrator defined it.
    domain_cfg_dir: Path = Path("/etc/xen")
    # Where `migrate-receive` puts the image of a vTPM stub domain that moves in (its cfg goes to
    # domain_cfg_dir): Xen's own place for domain images.
    vtpm_image_dir: Path = Path("/var/lib/xen/images")
    # RAM a snapshot's spool may take (MiB): an image that fits goes to memory, which keeps the
    # guest's pause as short as a bare `xl save`; a larger one goes to an encrypted file on disk.
    # -1: half of MemAvailable at the time; 0: always disk.
    spool_ram_mib: int = -1

    @classmethod
    def load(cls, explicit: str | os.PathLike | None = None, *, missing_ok: bool = False) -> Config:
        """`missing_ok`: a named file that does not exist yet means defaults (for `init`, which writes it)."""
        path = Path(explicit) if explicit else None
        if path is None and os.environ.get("XEN_VTPM_CONFIG"):
            path = Path(os.environ["XEN_VTPM_CONFIG"])
        if path is None:
            path = DEFAULT_CONFIG_PATH
            if not path.exists():
                return cls()
        parser = configparser.ConfigParser(interpolation=None)
        try:
            with open(path, encoding="utf-8") as fh:
                parser.read_file(fh)
        except FileNotFoundError:
            if missing_ok:
                return cls(path=path)
            raise ConfigError(f"{path}: config file not found; run `xen-vtpm init` or pass --config") from None
        except (OSError, configparser.Error) as exc:
            raise ConfigError(f"{path}: cannot read config ({exc.__class__.__name__}: {exc}); "
                              "fix or remove it") from None
        return cls.from_mapping(dict(parser[SECTION]) if parser.has_section(SECTION) else {}, path)

    @classmethod
    def from_mapping(cls, values: dict[str, str], path: Path | None = None) -> Config:
        cfg = cls(path=path)
        known = {f.name: f for f in dataclasses.fields(cls) if f.name != "path"}
        for key, raw in values.items():
            field = known.get(key)
            if field is None:
                raise ConfigError(f"{path}: unknown key {key!r} in [{SECTION}]; remove it or check the spelling")
            default = getattr(cfg, key)
            value: object
            try:
                if isinstance(default, Path):
                    value = Path(raw)
                elif isinstance(default, bool):
                    value = raw.strip().lower() in ("1", "yes", "true", "on")
                elif isinstance(default, int):
                    value = int(raw, 0)
                elif isinstance(default, float):
                    value = float(raw)
                else:
                    value = raw
            except ValueError:
                raise ConfigError(f"{path}: key {key!r} has invalid value {raw!r}; "
                                  f"expected {type(default).__name__}") from None
            setattr(cfg, key, value)
        return cfg

    def to_mapping(self) -> dict[str, str]:
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "path":
                continue
            value = getattr(self, f.name)
            out[f.name] = hex(value) if f.name in ("counter_index", "primary_handle") else str(value)
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temp + rename) so a crash never leaves half a config."""
        parser = configparser.ConfigParser(interpolation=None)
        parser[SECTION] = self.to_mapping()
        write_ini(Path(path), parser)
        self.path = Path(path)


def write_ini(path: Path, parser: configparser.ConfigParser) -> None:
    """Durably (see ``durable``): a crash leaves the old config or the new one, never half of one."""
    text = io.StringIO()
    parser.write(text)
    make_dirs(path.parent, what="creating the config directory")
    write_atomic(path, text.getvalue().encode("utf-8"), mode=0o600)
