"""Generated protobuf / gRPC code (``make proto``); only ``fedfms_secure.transport`` imports it."""
