"""The issuing side: the CA's X.509 builders (``builders``, pure), its directory and state
(``store``), the one-time bootstrap tokens (``bootstrap``), what the CA agrees to issue
(``issuance``), its hash-chained audit log (``audit``) and the enrollment service (``service``,
gRPC). Devices never import this package; the codes both ends share are in
``ztagent.enrollment``."""
