"""The ``pkcs11`` provider: a KeyGrid slot served by a token of another PKCS#11 module.

Each module runs in a supervised worker process of its own (``worker.py``,
bound to the module by ``ckapi.py``); the daemon talks to it through
``supervisor.ModuleWorker``. Nothing here is imported by the worker's
start-up except ``ckapi`` and ``worker``, so this package stays free of trio.
"""
