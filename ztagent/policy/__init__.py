"""Policy: engines (embedded Regorus, remote OPA), bundles, authoring tools, decision log."""
