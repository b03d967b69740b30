"""The reference inference workload: TorchScript classifiers over sensor windows, over gRPC.

torch is an optional extra (``ztagent[inference]``): importing this package does not import
it, so the CLI can name the missing extra instead of failing with an ImportError.
"""

from __future__ import annotations

import importlib.util

from ztagent.errors import ConfigError

TORCH_PIN = "torch==2.13.0"


def require_torch() -> None:
    """Raises ConfigError naming the extra to install when torch is missing."""
    if importlib.util.find_spec("torch") is None:
        raise ConfigError(
            "inference",
            "torch is not installed; the inference workload needs the 'inference' extra: "
            f"pip install 'ztagent[inference]' (pins the CPU build, {TORCH_PIN})",
        )
