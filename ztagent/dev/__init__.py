"""DEVELOPMENT ONLY tooling: the dev PKI (``pki.init_dev_pki``), the dev token issuer
(``issuer``), the dev TPM manufacturer (``tpm_manufacturer``), the measured-boot simulator with
its tamper option (``boot_sim``), the swtpm launcher (``swtpm``) and the demo (``demo*``) that
`make run` runs. Nothing outside dev/ and the CLI imports it; never use it in a fleet."""
