"""``fedfms-secure keys he-init`` and ``keys rotate-he``: the CKKS secret key, made at a site.

``he-init`` (at one site, once): generate the CKKS context with the manifest's parameters, keep it
in the bundle's ``he/`` folder, seal one envelope to every other site and publish them through the
server as key epoch 1. ``rotate-he`` (at a site holding the current key): re-encrypt the global
state under a new context and publish it with fresh envelopes as the next epoch, at a round
boundary. The server only relays the sealed envelopes; it can open none of them.
"""

from __future__ import annotations

import argparse


def register(ksub: argparse._SubParsersAction) -> None:
    """Adds ``he-init`` and ``rotate-he`` to the ``keys`` command group."""
    # the sub-commands are added once their library code is in place
    return None
