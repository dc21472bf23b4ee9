"""xen-vtpm: synchronized, TPM-sealed checkpoints of Xen guests and their vTPMs."""

__version__ = "0.1.0"
