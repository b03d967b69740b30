"""ztagent: a zero-trust security agent for edge nodes.

Architecture: five layers, and an import only ever points down (``tests/unit/test_layers.py``
enforces it, deferred imports included).

========  ===========================================================================
face      ``cli`` (parse, call, print: no logic of its own) and the demo (``dev/demo*``)
servers   ``sidecar/`` (the gRPC adapter around the admission pipeline, proxy, reloaders,
          the attestation service, cross-worker caches), ``workloads/`` (storage,
          inference), and the CA's gRPC service (``ca/service.py``)
sides     ``ca/`` issuing (X.509 builders, the CA store, bootstrap tokens, issuance policy,
          audit log); ``device/`` the device side and the fetchers (enroll / renew client,
          CSR, key stores, TPM driver, attest client, host facts, CRL and JWKS fetchers);
          ``dev/`` DEVELOPMENT ONLY tooling (dev PKI, dev token issuer, dev TPM
          manufacturer, boot simulator, swtpm launcher)
checks    ``pki/`` (device certificate verification, CRL update rules), ``tokens/``,
          ``posture/`` (evidence verification), ``policy/`` (engines, sources, decision
          records, authoring): values in, a typed result or a typed error out; no grpc,
          no sockets or processes of their own (only the OPA engine talks HTTP), an
          injected clock
base      ``config`` (one validated object), ``errors`` (the root error and its families,
          each naming its gRPC status as data), ``enrollment`` (the codes CA and device
          share), ``files`` (atomic writes, file stamps), ``timefmt`` (the one RFC 3339
          formatter), ``addresses`` (the one address parser), ``schedule`` (refresh at
          2/3, backoff with jitter), ``failure_log`` (a failing dependency logged once,
          then summarised), ``pkcs11_keys`` (PKCS#11 sessions and key stores: device and
          CA keys on one token share them), ``logs`` (text or JSON log lines, credentials
          redacted), ``randomness`` (per-call random ids from a pooled urandom),
          ``connection_cap`` (a bound on the connections a threaded HTTP server serves);
          gRPC-facing base:
          ``rpc_status`` (the one error-to-status mapping), ``signals``, ``_proto``
========  ===========================================================================

``ca/`` and ``device/`` never import each other; only the face and ``dev/`` import ``dev/``.
One exception to "base imports only base": ``config`` builds the checks' own policy objects
(``pki.policy.DevicePolicy``, ``tokens.policy.TokenPolicy``) so every rule is stated once, in
the domain, and wraps their errors with the key's name; those modules import only base.

Where things go: a new check is a module in its check package with its own error codes in
that package's ``errors.py`` and a unit test that feeds it every bad case; a new workload is a
folder in ``workloads/`` whose errors set ``status_name``; a new CLI command is a ``cmd_*``
function in ``cli.py`` that calls one library function and prints its result.
"""

__version__ = "0.1.0"
