"""fedfms-secure: federated fine-tuning of Segment Anything with DP-SGD, CKKS and mutual TLS."""

__version__ = "0.1.0"
