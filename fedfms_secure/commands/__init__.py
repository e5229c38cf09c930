"""Command groups of the ``fedfms-secure`` CLI, one module each.

Each module exposes ``register(subparsers)`` and imports its subsystem only inside its handlers,
so that starting the CLI (and the server daemon, which needs no torch) stays light.
"""
