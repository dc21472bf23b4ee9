"""Fuzz target: the checkpoint manifest parser (xen_vtpm.store.manifest.parse) -> IntegrityError.

The MAC is checked before parsing, so a forger cannot reach ``parse``; it is fuzzed anyway
because it claims to accept exactly what ``encode`` produces: any accepted input must
re-encode to the same bytes.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

with harness.instrumented():
    import store_seeds

    from xen_vtpm.errors import IntegrityError
    from xen_vtpm.store import manifest


def seeds() -> list[bytes]:
    return store_seeds.artifacts()[0]


def check(data: bytes) -> bool:
    try:
        parsed = manifest.parse(data, "fuzz")
    except IntegrityError as exc:
        harness.expect(exc)
        return False
    key = store_seeds.KEYS.manifest_mac
    sealed = manifest.encode(parsed, key)
    assert sealed[:-manifest.MAC_SIZE] == data, "accepted a manifest that is not in canonical form"
    assert manifest.decode(sealed, key, "fuzz") == parsed
    return True


if __name__ == "__main__":
    harness.main(check, seeds)
