"""The host's physical TPM through tpm2-pytss (ESAPI): seal, unseal, PCRs, NV counter.

Every TPM command goes through ``HostTpm._run`` so that TSS errors become the
tool's one-line errors and so that each command is counted (``ops``): the
benchmark reports how many TPM round trips a snapshot or rollback costs.

Sealed objects are keyed-hash objects under a primary storage key of the owner
hierarchy.  Their policy is PolicyPCR over the configured PCRs (plus
PolicyAuthValue for the rollback authorization object).  The PCR values at seal
time are kept next to the blob: when a later unseal fails its policy we can say
*which* PCRs moved, which the TPM itself never tells.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

# The TSS logs every TPM error response to stderr; the tool reports errors itself.
os.environ.setdefault("TSS2_LOG", "all+NONE")

from tpm2_pytss import ESAPI, TSS2_Exception  # noqa: E402
from tpm2_pytss.constants import (  # noqa: E402
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_HT,
    TPM2_NT,
    TPM2_PT,
    TPM2_RC,
    TPM2_SE,
    TPMA_NV,
    TPMA_OBJECT,
    TPMA_SESSION,
)
from tpm2_pytss.types import (  # noqa: E402
    TPM2B_AUTH,
    TPM2B_DIGEST,
    TPM2B_NV_PUBLIC,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPM2B_SENSITIVE_DATA,
    TPML_DIGEST_VALUES,
    TPML_PCR_SELECTION,
    TPMS_NV_PUBLIC,
    TPMS_SENSITIVE_CREATE,
    TPMT_HA,
    TPMT_PUBLIC,
    TPMT_SYM_DEF,
    TPMU_HA,
)

from xen_vtpm.durable import make_dirs, write_atomic  # noqa: E402
from xen_vtpm.errors import (  # noqa: E402
    AuthorizationDenied,
    ConfigError,
    IntegrityError,
    NvIndexError,
    PcrPolicyMismatch,
    TpmError,
    TpmLockout,
    TpmUnreachable,
)

# ECC P-256 primaries are derived in milliseconds (RSA key generation takes
# seconds on some TPMs) and, like every primary, are a pure function of the
# owner seed and this template: the same key comes back on every run.  NODA:
# loading under it must keep working while wrong rollback secrets have put the
# TPM into dictionary-attack lockout, or a guesser could stop all snapshots.
PRIMARY_ATTRS = TPMA_OBJECT.DEFAULT_TPM2_TOOLS_CREATEPRIMARY_ATTRS | TPMA_OBJECT.NODA
PRIMARY_TEMPLATE = "ecc256:aes128cfb"
_TCTI_LAYER = 10 << 16
_RC_LAYER_MASK = 0xFF << 16
_COUNTER_ATTRS = TPMA_NV.OWNERWRITE | TPMA_NV.OWNERREAD | TPMA_NV.NO_DA
_COUNTER_FORBIDDEN = TPMA_NV.PLATFORMCREATE | TPMA_NV.POLICY_DELETE
_PCR_MISMATCH_RCS = (TPM2_RC.POLICY_FAIL, TPM2_RC.VALUE, TPM2_RC.PCR_CHANGED)
# A TPM shared with vtpmmgr (xen-vtpmmgr(7): "concurrent use of the TPM ... can result in unexpected busy
# errors") answers RETRY, YIELDED or TESTING; ESAPI resubmits those at once up to five times, these
# retries wait in between.  The command was not executed, so sending it again cannot run it twice.
_BUSY_RCS = (TPM2_RC.RETRY, TPM2_RC.YIELDED, TPM2_RC.TESTING)
BUSY_BACKOFF = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)


def auth_value(secret: bytes) -> bytes:
    """Hashing gives a fixed-size authValue (the TPM caps it at the nameAlg digest size) whatever the file holds."""
    return hashlib.sha256(b"xen-vtpm rollback auth v1\0" + secret).digest()


def parse_pcrs(spec: str) -> tuple[str, list[int]]:
    """``"sha256:0,2,4,7"`` -> ("sha256", [0, 2, 4, 7]); ConfigError on anything else."""
    bank, sep, rest = spec.partition(":")
    try:
        if not sep or bank.lower() != "sha256":
            raise ValueError
        pcrs = sorted({int(p, 10) for p in rest.split(",") if p.strip()})
        if not pcrs or not all(0 <= p < 24 for p in pcrs):
            raise ValueError
    except ValueError:
        raise ConfigError(f"pcrs = {spec!r}: expected the SHA-256 bank and PCR numbers 0-23, "
                          "e.g. 'sha256:0,2,4,7'; fix the config") from None
    return "sha256", pcrs


@dataclasses.dataclass
class SealedBlob:
    """A sealed object as stored on disk: TPM-encrypted private part, public part, PCRs at seal time."""

    public: bytes
    private: bytes
    pcrs: str
    pcr_values: dict[int, bytes]
    auth_policy: bool            # PolicyAuthValue follows PolicyPCR

    def to_json(self) -> str:
        return json.dumps({
            "version": 1, "public": self.public.hex(), "private": self.private.hex(), "pcrs": self.pcrs,
            "pcr_values": {str(k): v.hex() for k, v in self.pcr_values.items()},
            "auth_policy": self.auth_policy,
        }, indent=1, sort_keys=True)

    @classmethod
    def load(cls, path: Path) -> SealedBlob:
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            return cls(bytes.fromhex(d["public"]), bytes.fromhex(d["private"]), d["pcrs"],
                       {int(k): bytes.fromhex(v) for k, v in d["pcr_values"].items()}, bool(d["auth_policy"]))
        except FileNotFoundError:
            raise
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise IntegrityError(f"{path}: sealed blob unreadable ({exc.__class__.__name__}); "
                                 "restore it from backup or re-run `xen-vtpm init` on a fresh state dir") from None

    def save(self, path: Path) -> None:
        write_private(path, self.to_json().encode())


def write_private(path: Path, data: bytes) -> None:
    """A 0600 file, published durably: a crash leaves the old file or the new one."""
    make_dirs(path.parent, 0o700)
    write_atomic(path, data, mode=0o600)


# TPM commands sent by this process, by name (connections are short-lived; benchmarks and tests
# count across them).
OPS: collections.Counter[str] = collections.Counter()


class HostTpm:
    """One connection to the host TPM; use as a context manager."""

    def __init__(self, tcti: str, pcrs: str, primary_handle: int = 0) -> None:
        self.tcti = tcti
        self.bank, self.pcr_list = parse_pcrs(pcrs)
        self.pcr_spec = f"{self.bank}:{','.join(map(str, self.pcr_list))}"
        self.primary_handle = primary_handle
        self._primary: ESYS_TR | None = None
        self._nv: dict[int, ESYS_TR] = {}
        try:
            self.ctx = ESAPI(tcti)
        except TSS2_Exception as exc:
            raise TpmUnreachable(f"host TPM at {tcti!r} unreachable ({exc}); check the device or the swtpm "
                                 "and the tcti key in the config") from None
        if not _has_resource_manager(tcti):
            self._flush_stale()

    # --- plumbing -----------------------------------------------------------
    def __enter__(self) -> HostTpm:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self.ctx is None:
            return
        if self._primary is not None and not self.primary_handle:
            self._flush(self._primary)
        self.ctx.close()
        self.ctx = None

    def _run(self, name: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        OPS[name] += 1
        for delay in (*BUSY_BACKOFF, None):
            try:
                return fn(*args, **kw)
            except TSS2_Exception as exc:
                if exc.rc not in _BUSY_RCS:
                    self._raise(name, exc)
                if delay is None:
                    raise TpmError(f"{name}: the host TPM at {self.tcti!r} still answers busy ({exc}) after "
                                   f"{len(BUSY_BACKOFF) + 1} tries over {sum(BUSY_BACKOFF):g} s; something else "
                                   "keeps it busy (vtpmmgr on dom0's locality? see docs/real-xen.md) — retry "
                                   "later") from None
                time.sleep(delay)       # RETRY/YIELDED/TESTING: the command did not run, so it is safe to send again
        raise AssertionError("unreachable: the last try returns or raises")

    def _raise(self, name: str, exc: TSS2_Exception) -> NoReturn:
        if exc.rc & _RC_LAYER_MASK == _TCTI_LAYER:
            raise TpmUnreachable(f"host TPM at {self.tcti!r} stopped answering during {name} ({exc}); "
                                 "check the device or the swtpm and retry") from None
        if exc.error == TPM2_RC.LOCKOUT:
            raise TpmLockout(f"{name}: {self.lockout_message()}") from None
        raise exc

    def command(self, name: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """One TPM command for a module beside this one, with the same error mapping and counting."""
        return self._run(name, fn, *args, **kw)

    def _flush(self, handle: ESYS_TR) -> None:
        """Free a transient object or session; failures only mean it is already gone."""
        try:
            self._run("FlushContext", self.ctx.flush_context, handle)
        except (TSS2_Exception, TpmError):
            pass

    def _flush_stale(self) -> None:
        """Without a resource manager (swtpm socket), objects a crashed client loaded stay in the TPM
        and eventually fill it.  The socket serves one client at a time, so any transient object
        present now is garbage."""
        for first in (TPM2_HT.TRANSIENT << 24, TPM2_HT.LOADED_SESSION << 24):
            _, cap = self._run("GetCapability", self.ctx.get_capability, TPM2_CAP.HANDLES, first, 64)
            for handle in list(cap.data.handles):
                try:
                    self._flush(self.ctx.tr_from_tpmpublic(handle))
                except TSS2_Exception:
                    pass  # already gone

    def _policy_session(self, trial: bool = False) -> ESYS_TR:
        # Salted with the primary key and response-encrypted, so the unsealed
        # secret never crosses the TPM bus in clear.
        kind = TPM2_SE.TRIAL if trial else TPM2_SE.POLICY
        session = self._run("StartAuthSession", self.ctx.start_auth_session, self.primary(), ESYS_TR.NONE,
                            kind, TPMT_SYM_DEF.parse("aes128cfb"), TPM2_ALG.SHA256)
        if not trial:
            self.ctx.trsess_set_attributes(session, TPMA_SESSION.CONTINUESESSION | TPMA_SESSION.ENCRYPT)
        return session

    # --- objects --------------------------------------------------------------
    def primary(self) -> ESYS_TR:
        if self._primary is None:
            if self.primary_handle:
                try:
                    self._primary = self._run("ReadPublic", self.ctx.tr_from_tpmpublic, self.primary_handle)
                except TSS2_Exception as exc:
                    raise TpmError(f"primary key at handle {self.primary_handle:#010x} not found ({exc}); "
                                   "persist one there or set primary_handle = 0 in the config") from None
            else:
                template = TPM2B_PUBLIC(TPMT_PUBLIC.parse(PRIMARY_TEMPLATE, objectAttributes=PRIMARY_ATTRS))
                self._primary = self._run("CreatePrimary", self.ctx.create_primary, None, template)[0]
        return self._primary

    def pcr_values(self) -> dict[int, bytes]:
        values: dict[int, bytes] = {}
        # PCR_Read returns at most 8 digests per call; ask again for the rest.
        pending = list(self.pcr_list)
        while pending:
            sel = TPML_PCR_SELECTION.parse(f"{self.bank}:{','.join(map(str, pending))}")
            _, got_sel, digests = self._run("PCR_Read", self.ctx.pcr_read, sel)
            got = [i for s in got_sel for i in range(s.sizeofSelect * 8) if s.pcrSelect[i // 8] & (1 << (i % 8))]
            if not got:
                raise TpmError(f"host TPM has no {self.bank} bank for PCRs {pending}; change pcrs in the config")
            values.update(zip(got, (bytes(d) for d in digests), strict=False))  # the TPM may answer fewer
            pending = [p for p in pending if p not in values]
        return values

    def extend_pcr(self, pcr: int, data: bytes) -> None:
        """Measure ``data`` into a PCR (used to simulate a changed boot chain on swtpm)."""
        digest = TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=hashlib.sha256(data).digest()))
        self._run("PCR_Extend", self.ctx.pcr_extend, getattr(ESYS_TR, f"PCR{pcr}"), TPML_DIGEST_VALUES([digest]))

    def get_random(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            out += bytes(self._run("GetRandom", self.ctx.get_random, n - len(out)))
        return out

    def seal(self, data: bytes, auth: bytes | None = None) -> SealedBlob:
        """Seal ``data`` to the current PCR values (and, if given, to an authValue that is DA-protected)."""
        values = self.pcr_values()
        sel = TPML_PCR_SELECTION.parse(self.pcr_spec)
        trial = self._policy_session(trial=True)
        try:
            expected = hashlib.sha256(b"".join(values[p] for p in self.pcr_list)).digest()
            self._run("PolicyPCR", self.ctx.policy_pcr, trial, expected, sel)
            if auth is not None:
                self._run("PolicyAuthValue", self.ctx.policy_auth_value, trial)
            policy = self._run("PolicyGetDigest", self.ctx.policy_get_digest, trial)
        finally:
            self._flush(trial)
        # No USERWITHAUTH: only the policy opens it.  NODA only without an auth
        # value: wrong rollback secrets must count towards the DA lockout.
        attrs = TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | (TPMA_OBJECT.NODA if auth is None else 0)
        template = TPM2B_PUBLIC(TPMT_PUBLIC(
            type=TPM2_ALG.KEYEDHASH, nameAlg=TPM2_ALG.SHA256, objectAttributes=attrs,
            authPolicy=TPM2B_DIGEST(policy)))
        template.publicArea.parameters.keyedHashDetail.scheme.scheme = TPM2_ALG.NULL
        sensitive = TPM2B_SENSITIVE_CREATE(TPMS_SENSITIVE_CREATE(
            userAuth=TPM2B_AUTH(auth or b""), data=TPM2B_SENSITIVE_DATA(data)))
        private, public, *_ = self._run("Create", self.ctx.create, self.primary(), sensitive, template)
        return SealedBlob(public.marshal(), private.marshal(), self.pcr_spec, values, auth is not None)

    def unseal(self, blob: SealedBlob, what: str, auth: bytes | None = None) -> bytes:
        """Unseal; PcrPolicyMismatch names the PCRs that moved, AuthorizationDenied/TpmLockout for the auth."""
        if blob.pcrs != self.pcr_spec:
            raise PcrPolicyMismatch(f"{what}: sealed to PCRs {blob.pcrs} but the config says {self.pcr_spec}; "
                                    "restore the pcrs setting it was sealed with")
        public, _ = TPM2B_PUBLIC.unmarshal(blob.public)
        private, _ = TPM2B_PRIVATE.unmarshal(blob.private)
        try:
            handle = self._run("Load", self.ctx.load, self.primary(), private, public)
        except TSS2_Exception as exc:
            raise TpmError(f"{what}: this TPM cannot load the sealed blob ({exc}); it was sealed by another TPM "
                           "or the owner hierarchy was cleared — re-run `xen-vtpm init` on a new state dir") from None
        try:
            for attempt in (1, 2):
                if auth is not None:
                    self.ctx.tr_set_auth(handle, auth)
                session = self._policy_session()
                try:
                    self._run("PolicyPCR", self.ctx.policy_pcr, session, None,
                              TPML_PCR_SELECTION.parse(self.pcr_spec))
                    if blob.auth_policy:
                        self._run("PolicyAuthValue", self.ctx.policy_auth_value, session)
                    return bytes(self._run("Unseal", self.ctx.unseal, handle, session1=session))
                except TpmLockout:
                    raise TpmLockout(f"{what}: {self.lockout_message()}") from None
                except TSS2_Exception as exc:
                    # PCR_CHANGED: a PCR was extended between PolicyPCR and Unseal; retry once.
                    if exc.error != TPM2_RC.PCR_CHANGED or attempt == 2:
                        self._raise_unseal_error(exc, blob, what)
                finally:
                    self._flush(session)
            raise AssertionError("unreachable: the second attempt returns or raises")
        finally:
            self._flush(handle)

    def _raise_unseal_error(self, exc: TSS2_Exception, blob: SealedBlob, what: str) -> NoReturn:
        if exc.error == TPM2_RC.LOCKOUT:
            raise TpmLockout(f"{what}: {self.lockout_message()}") from None
        if exc.error in (TPM2_RC.AUTH_FAIL, TPM2_RC.BAD_AUTH):
            info = self.lockout_info()
            left = max(info["max_tries"] - info["failures"], 0)
            raise AuthorizationDenied(f"{what}: the TPM refused the rollback secret ({left} tries left before "
                                      "dictionary-attack lockout); check --auth-file") from None
        if exc.error in _PCR_MISMATCH_RCS:
            now = self.pcr_values()
            moved = [p for p in self.pcr_list if now.get(p) != blob.pcr_values.get(p)]
            if moved:
                names = ", ".join(f"{self.bank}:{p}" for p in moved)
                raise PcrPolicyMismatch(f"{what}: PCR policy not satisfied, PCRs changed since sealing: {names}; "
                                        "boot the configuration it was sealed under (see docs/host-tpm.md)") from None
            raise IntegrityError(f"{what}: PCR policy check failed although PCRs {self.pcr_spec} match their sealed "
                                 "values; the sealed blob was altered — restore it from backup") from None
        raise TpmError(f"{what}: unseal failed ({exc}); check the host TPM") from None

    # --- dictionary-attack state --------------------------------------------------
    def lockout_info(self) -> dict[str, int]:
        _, cap = self._run("GetCapability", self.ctx.get_capability, TPM2_CAP.TPM_PROPERTIES,
                           TPM2_PT.LOCKOUT_COUNTER, 4)
        props = {p.property: p.value for p in cap.data.tpmProperties}
        return {"failures": props.get(TPM2_PT.LOCKOUT_COUNTER, 0), "max_tries": props.get(TPM2_PT.MAX_AUTH_FAIL, 0),
                "interval": props.get(TPM2_PT.LOCKOUT_INTERVAL, 0),
                "recovery": props.get(TPM2_PT.LOCKOUT_RECOVERY, 0)}

    def lockout_message(self) -> str:
        info = self.lockout_info()
        head = (f"host TPM is in dictionary-attack lockout ({info['failures']}/{info['max_tries']} failed "
                "authorizations)")
        if info["interval"]:
            return (f"{head}; one try comes back every {_duration(info['interval'])}, so wait up to "
                    f"{_duration(info['interval'])} or have the lockout-hierarchy owner reset it "
                    "(tpm2_dictionarylockout --clear-lockout)")
        return f"{head}; it never recovers by itself: reset it with the lockout authorization " \
               "(tpm2_dictionarylockout --clear-lockout)"

    def set_da_parameters(self, max_tries: int, recovery: int, lockout_recovery: int) -> None:
        """Needs the lockout authorization (empty on a fresh TPM); tests use it to make lockout quick."""
        self._run("DictionaryAttackParameters", self.ctx.dictionary_attack_parameters,
                  max_tries, recovery, lockout_recovery)

    # --- NV monotonic counter ---------------------------------------------------------
    def counter_define(self, index: int) -> int:
        """Define the owner counter at ``index`` if absent, initialise it, return its value."""
        if self._counter_handle(index, missing_ok=True) is None:
            public = TPM2B_NV_PUBLIC(TPMS_NV_PUBLIC(
                nvIndex=index, nameAlg=TPM2_ALG.SHA256, dataSize=8,
                attributes=_COUNTER_ATTRS | (TPM2_NT.COUNTER << TPMA_NV.TPM2_NT_SHIFT)))
            try:
                self._run("NV_DefineSpace", self.ctx.nv_define_space, b"", public)
            except TSS2_Exception as exc:
                raise NvIndexError(f"NV index {index:#010x}: cannot define the counter ({exc}); the owner "
                                   "hierarchy needs an empty authorization, or pick another counter_index") from None
        handle = self._counter_handle(index)
        public, _ = self._run("NV_ReadPublic", self.ctx.nv_read_public, handle)
        if not public.nvPublic.attributes & TPMA_NV.WRITTEN:
            # A fresh counter cannot be read until written; its first increment sets it to the
            # highest value any counter on this TPM ever had, so a redefined index never goes back.
            self._run("NV_Increment", self.ctx.nv_increment, handle, auth_handle=ESYS_TR.RH_OWNER)
        return self.counter_read(index)

    def counter_exists(self, index: int) -> bool:
        return self._counter_handle(index, missing_ok=True) is not None

    def counter_read(self, index: int) -> int:
        handle = self._counter_handle(index)
        try:
            data = self._run("NV_Read", self.ctx.nv_read, handle, 8, 0, auth_handle=ESYS_TR.RH_OWNER)
        except TSS2_Exception as exc:
            raise NvIndexError(f"NV index {index:#010x}: counter unreadable ({exc}); re-run `xen-vtpm init`") from None
        return int.from_bytes(bytes(data), "big")

    def counter_increment(self, index: int) -> int:
        handle = self._counter_handle(index)
        try:
            self._run("NV_Increment", self.ctx.nv_increment, handle, auth_handle=ESYS_TR.RH_OWNER)
        except TSS2_Exception as exc:
            raise NvIndexError(f"NV index {index:#010x}: increment refused ({exc}); "
                               "check the owner authorization") from None
        return self.counter_read(index)

    def _counter_handle(self, index: int, missing_ok: bool = False) -> ESYS_TR | None:
        if index in self._nv:
            return self._nv[index]
        try:
            handle = self._run("NV_ReadPublic", self.ctx.tr_from_tpmpublic, index)
        except TSS2_Exception as exc:
            if missing_ok and exc.error == TPM2_RC.HANDLE:
                return None
            raise NvIndexError(f"NV index {index:#010x}: not defined on this TPM ({exc}); run `xen-vtpm init`, "
                               "or the TPM was cleared/replaced (then the state dir no longer matches it)") from None
        public, _ = self._run("NV_ReadPublic", self.ctx.nv_read_public, handle)
        nv = public.nvPublic
        kind = (nv.attributes & TPMA_NV.TPM2_NT_MASK) >> TPMA_NV.TPM2_NT_SHIFT
        if kind != TPM2_NT.COUNTER or nv.dataSize != 8 or (nv.attributes & _COUNTER_ATTRS) != _COUNTER_ATTRS \
                or nv.attributes & _COUNTER_FORBIDDEN:
            raise NvIndexError(f"NV index {index:#010x}: not an owner-controlled monotonic counter (attributes "
                               f"{nv.attributes}); someone else owns it — set another counter_index in the config")
        self._nv[index] = handle
        return handle


def _has_resource_manager(tcti: str) -> bool:
    return tcti.startswith("device:/dev/tpmrm") or tcti.startswith("tabrmd")


def _duration(seconds: int) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60} s" if seconds % 60 else f"{seconds // 60} min"
    return f"{seconds} s"
