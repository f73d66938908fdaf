"""Fault-injection harness: a switchable TCP proxy, an append-only ledger and a process cluster.

See README.md in this folder. Import the modules as ``faults.<module>`` (``tests/`` is on
``sys.path`` because it has no ``__init__.py``).
"""
