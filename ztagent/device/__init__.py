"""The device side: enrollment and renewal (``enroll``), the CSR (``csr``), where the key is
kept (``keystores``: file, PKCS#11, TPM), the TPM driver (``tpm``), the attestation client
(``attest``) and the CRL fetcher (``crl_fetch``, which the sidecar also runs). It talks to the
CA and the sidecar over the network; the checks it relies on live in pki/, posture/, tokens/."""
