"""Checkpoint store: encrypted, deduplicated, tamper-evident (format: docs/formats.md, "Checkpoint store")."""
from .manifest import Manifest, StreamRecord
from .reader import CheckpointReader
from .repository import Repository
from .restore import Sink
from .writer import CheckpointWriter

__all__ = ["Repository", "CheckpointWriter", "CheckpointReader", "Manifest", "StreamRecord", "Sink"]
