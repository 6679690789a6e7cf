"""PKCS#11 semantics without I/O: slots, tokens, sessions, objects, operations.

Every ``C_*`` method of ``Core`` either returns its result or raises a
``PKCS11Error``; methods that do expensive cryptography are generators that
yield ``Offload`` requests (see ``offload.py``), which the caller runs inline
or in a worker thread and sends back. Nothing here imports trio or sockets.
"""
