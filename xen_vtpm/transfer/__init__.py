"""Moving a guest and its vTPM to another host: the wire protocol and its cryptography.

No TPM and no Xen here: a host's TPM-resident identity is handed in (``session.Identity``,
implemented by ``host.identity``), so this package runs and is tested on its own.
"""
