"""The admission core: one call's plain values in (peer certificate, metadata, method, peer
address), a typed ``Verdict`` out — allow with the identity headers, or a refusal with its
status, stable code and message — and a decision-log record either way. No grpc: the
sidecar's proxy (and a proxyless server interceptor) only extract the values and act on the
verdict."""
