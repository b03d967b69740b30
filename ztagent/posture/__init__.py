"""Device posture: measured boot, TPM quotes, firmware manifests and their verification."""
