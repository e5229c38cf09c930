"""What both ends of the wire share: protobuf <-> dataclass conversion (``serde``), channel
options and TLS credentials (``channel``), metadata keys and the status-code map (``codes``),
the site's stub (``client``) and the check that the generated code is current (``codegen``).

It may import ``protocol``, ``errors``, ``keys`` (type hints of a bundle) and the generated
``fedfms_secure.v1`` modules; never ``fedfms_secure.server`` nor ``fedfms_secure.site``, so a
site process loads no server code and the server none of the site's.
"""
