"""The tool's configuration: one INI file, every key with a default.

Lookup order for the file: ``--config``, then ``$XEN_VTPM_CONFIG``, then
``/etc/xen-vtpm/xen-vtpm.conf``.  A missing file means "all defaults", so a
real dom0 needs no config until ``xen-vtpm init`` writes one.

Besides ``[xen-vtpm]``, the sections ``[retention]`` (the rules `prune` and the scheduled runs
apply) and ``[schedule]`` (when the timers run), each with per-guest overrides in
``[retention.GUEST]`` and ``[schedule.GUEST]``.
"""
from __future__ import annotations

import configparser
import dataclasses
import io
import os
from pathlib import Path
from typing import Any

from .durable import make_dirs, write_atomic
from .errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/xen-vtpm/xen-vtpm.conf")
SECTION = "xen-vtpm"

# Boot-chain PCRs in the SHA-256 bank: firmware (0), option ROMs (2), boot
# loader (4) and Secure Boot policy (7).  Sealing to these means a changed boot
# chain cannot unseal the host key, while ordinary runtime extends of 8+ by the
# OS do not lock the admin out.
DEFAULT_PCRS = "sha256:0,2,4,7"

RETENTION = "retention"
SCHEDULE = "schedule"
# The keys of the day-two sections and their defaults (which give each key its type).
RETENTION_DEFAULTS: dict[str, int | bool] = {
    "keep_last": 0, "keep_hourly": 0, "keep_daily": 0, "keep_weekly": 0, "keep_monthly": 0, "keep_yearly": 0,
    "include_saves": False,
}
SCHEDULE_DEFAULTS: dict[str, str | bool] = {"on_calendar": "daily", "prune": True}
_DAY_TWO: dict[str, dict[str, Any]] = {RETENTION: RETENTION_DEFAULTS, SCHEDULE: SCHEDULE_DEFAULTS}


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
    # The swtpm backend (HVM guests whose QEMU has `-tpmdev emulator`): the swtpm binary, where each
    # vTPM's control socket and pid file live (<dir>/<vtpm uuid>.sock, .pid; QEMU must reach the
    # socket), and libxl's XEN_LIB_DIR, where it leaves the device model's state (qemu-save.<domid>).
    swtpm: str = "swtpm"
    swtpm_run_dir: Path = Path("/run/xen-vtpm")
    xen_lib_dir: Path = Path("/var/lib/xen")
    # The [retention] and [schedule] sections and their per-guest overrides, checked when loaded.
    sections: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict, repr=False)

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
        cfg = cls.from_mapping(dict(parser[SECTION]) if parser.has_section(SECTION) else {}, path)
        cfg.sections = {name: dict(parser[name]) for name in parser.sections() if name.split(".")[0] in _DAY_TWO}
        for name in cfg.sections:   # a typo stops every command, as one in [xen-vtpm] does
            base, _, guest = name.partition(".")
            cfg._section(base, guest or None)
        return cfg

    @classmethod
    def from_mapping(cls, values: dict[str, str], path: Path | None = None) -> Config:
        cfg = cls(path=path)
        known = {f.name for f in dataclasses.fields(cls) if f.name not in _NOT_KEYS}
        for key, raw in values.items():
            if key not in known:
                raise ConfigError(f"{path}: unknown key {key!r} in [{SECTION}]; remove it or check the spelling")
            setattr(cfg, key, _convert(raw, getattr(cfg, key), path, SECTION, key))
        return cfg

    def retention(self, guest: str | None = None) -> dict[str, Any]:
        """The [retention] keys (as typed as RETENTION_DEFAULTS), with [retention.GUEST] over them."""
        return self._section(RETENTION, guest)

    def schedule(self, guest: str | None = None) -> dict[str, Any]:
        """The [schedule] keys (as typed as SCHEDULE_DEFAULTS), with [schedule.GUEST] over them."""
        return self._section(SCHEDULE, guest)

    def _section(self, base: str, guest: str | None) -> dict[str, Any]:
        values: dict[str, Any] = dict(_DAY_TWO[base])
        for name in (base, f"{base}.{guest}") if guest else (base,):
            for key, raw in self.sections.get(name, {}).items():
                if key not in values:
                    raise ConfigError(f"{self.path}: unknown key {key!r} in [{name}]; remove it or check the "
                                      f"spelling (known: {', '.join(_DAY_TWO[base])})")
                values[key] = _convert(raw, _DAY_TWO[base][key], self.path, name, key)
        return values

    def to_mapping(self) -> dict[str, str]:
        out = {}
        for f in dataclasses.fields(self):
            if f.name in _NOT_KEYS:
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


_NOT_KEYS = ("path", "sections")


def _convert(raw: str, default: object, path: Path | None, section: str, key: str) -> object:
    """``raw`` as the type of ``default``; ConfigError naming the file, section and key."""
    try:
        if isinstance(default, Path):
            return Path(raw)
        if isinstance(default, bool):
            word = raw.strip().lower()
            if word not in ("1", "yes", "true", "on", "0", "no", "false", "off"):
                raise ValueError(raw)
            return word in ("1", "yes", "true", "on")
        if isinstance(default, int):
            value = int(raw, 0)
            if section != SECTION and value < 0:   # counts of the day-two sections
                raise ValueError(raw)
            return value
        if isinstance(default, float):
            return float(raw)
        return raw
    except ValueError:
        if section == SECTION:
            raise ConfigError(f"{path}: key {key!r} has invalid value {raw!r}; "
                              f"expected {type(default).__name__}") from None
        expected = "yes or no" if isinstance(default, bool) else "a count >= 0"
        raise ConfigError(f"{path}: key {key!r} in [{section}] has invalid value {raw!r}; expected "
                          f"{expected}") from None


def write_ini(path: Path, parser: configparser.ConfigParser) -> None:
    """Durably (see ``durable``): a crash leaves the old config or the new one, never half of one."""
    text = io.StringIO()
    parser.write(text)
    make_dirs(path.parent, what="creating the config directory")
    write_atomic(path, text.getvalue().encode("utf-8"), mode=0o600)
