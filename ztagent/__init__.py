"""ztagent: a zero-trust security agent for edge nodes."""

__version__ = "0.1.0"
