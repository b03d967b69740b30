"""Device posture: measured boot, TPM quotes, firmware manifests and their verification."""

from __future__ import annotations

from typing import Any


def unverified_posture() -> dict[str, Any]:
    """``input.posture`` of a device with no (or no fresh) attestation; the verified
    counterpart is ``ztagent.posture.verifier.AttestedPosture.as_input``."""
    return {
        "verified": False,
        "age_s": None,
        "firmware": {"name": None, "version": None, "signed": False, "signer": None},
        "boot": {"verified": False, "pcrs": {}},
        "host": {},
    }
