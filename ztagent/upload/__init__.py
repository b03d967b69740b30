"""Store and forward: what leaves the node, across outages.

``decision_logs``: the sidecar's decision log shipped in OPA's decision-log format to a
collector; ``mqtt``: the escalation outbox published to an MQTT broker with the node's
identity. Both read what is already on disk (the log files, the storage outbox) and never
touch the request path.
"""
