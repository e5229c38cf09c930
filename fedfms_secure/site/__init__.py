"""The site's room: everything that runs only in ``fedfms-secure client`` at a hospital or lab.

* ``daemon``  the site daemon: join, wait for the CKKS key, download the global model, train
              locally under DP-SGD, upload the encrypted weighted delta, save the final model
* ``hekeys``  the site's CKKS key handling: ``keys he-init`` and ``keys rotate-he`` (make the key,
              seal it to the other sites' certified envelope keys, re-encrypt the global state)
* ``metrics`` the site's own per-round record (``STATE/metrics.jsonl``, 0600): its scores, bytes,
              epsilon; the server is sent only ``protocol.SERVER_METRICS``

It may import ``transport`` (the client stub), ``he`` (codecs), ``keys`` (bundles, envelopes),
``model``, ``data``, ``train``, ``privacy``, ``protocol`` and ``errors``; never
``fedfms_secure.server``: a site process loads no server code.
"""
