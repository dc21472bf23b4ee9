"""What one checkpoint's writer or reader needs from its store, and nothing more.

``Repository`` builds one ``StoreContext`` and hands it to every ``CheckpointWriter`` and
``CheckpointReader``; they import this module, never ``repository``, so the dependency runs one
way (repository → writer/reader → context).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from ..errors import IntegrityError
from .catalog import Catalog
from .chunks import ChunkCipher
from .fsio import unlink_if_present

# The only names the store ever creates, relative to the state dir (temporary names included).
STORE_FILE_RE = re.compile(r"(packs/[0-9a-f]{32}\.pack|manifests/[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\.manifest)(\.tmp)?")


@dataclasses.dataclass(frozen=True)
class StoreContext:
    state_dir: Path
    pack_dir: Path
    manifest_dir: Path
    catalog: Catalog
    cipher: ChunkCipher
    mac_key: bytes                        # the manifest MAC key
    chunk_sizes: tuple[int, int, int]     # min/avg/max of the content-defined chunker
    pack_target: int                      # a pack is published once it reaches this size

    @staticmethod
    def manifest_rel(checkpoint_id: str) -> str:
        """The manifest's name relative to the state dir, as journal rows record it."""
        return f"manifests/{checkpoint_id}.manifest"

    def manifest_path(self, checkpoint_id: str) -> Path:
        return self.state_dir / self.manifest_rel(checkpoint_id)

    def undo_files(self, relpaths: list[str]) -> None:
        """Remove store files named by a journal row (already-gone files are fine)."""
        for rel in relpaths:
            # Names come from journal rows: never let an altered row delete outside the store.
            if not STORE_FILE_RE.fullmatch(rel):
                raise IntegrityError(f"{self.catalog.path}: journal names {rel!r}, which is not a store file; "
                                     "the catalog was altered — inspect it before running recover again")
            unlink_if_present(self.state_dir / rel)
