"""The reference storage workload: an encrypted, per-device key-value store over gRPC."""
