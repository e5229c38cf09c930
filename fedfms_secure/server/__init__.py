"""The coordinator's room: everything that runs only in ``fedfms-secure server``.

It holds the round state machine (``coordinator``), its upload intake (``uploads``) and round
closer (``closer``), its CKKS key-epoch registry (``key_epochs``), the pure checks of a chunked
upload (``checks``), the vector length of each preset and mode without torch (``plan_sizes``),
the SQLite/blob/pack state (``store``), the gRPC
servicer and interceptors (``servicer``, ``interceptors``) and the daemon that wires them
(``daemon``). It may import ``transport`` (what both ends share), ``he`` (ciphertext sums, never
a secret key), ``keys`` (bundles, revocation), ``protocol`` and ``errors``; never
``fedfms_secure.site``, and never torch: the server sums ciphertexts and trains nothing.
"""
