"""Command groups of the ``fedfms-secure`` CLI, one module each (``keys``, ``status``, ``model``,
``privacy``, ``bench``, ``data``, ``train``); the daemons and the demo are wired in ``cli.py``.

What this room holds: argument declarations and thin handlers that parse, call one front door of
a subsystem and print. Each module exposes ``register(subparsers)``; every option has help text
and a default the help shows. Options that are settings of a daemon are not declared here: they
come from the fields of :mod:`fedfms_secure.config` (``add_config_options``), so a flag, its TOML
key and its field share one name.

What it may import: at module level only the standard library, :mod:`fedfms_secure.config`,
:mod:`fedfms_secure.errors`, :mod:`fedfms_secure.protocol` and sibling command modules, none of
which pull in torch, opacus or grpc. Subsystems (``data``, ``model``, ``train``, ``privacy``,
``he``, ``keys``, ``transport``) are imported inside the handlers, so that building the parser,
``--help`` and the server daemon stay light (no torch in the server process).
"""
