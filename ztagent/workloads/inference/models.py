"""Loading TorchScript models whose digest matches their manifest, and running them.

With trusted model-signing keys (``--model-keys``), the manifest's bytes must first verify
against its detached signature ``<name>.manifest.sig`` (the same envelope as firmware
manifests: ``{"key_id", "alg": "Ed25519" | "ES256", "sig"}``), so a model and its manifest
cannot be swapped together by whoever can write the models directory.

The model file is read once into memory; its SHA-256 is compared with the manifest and the
TorchScript module is deserialised from those same bytes, so the file cannot change between
the check and the load. A loaded model is smoke-tested with a zero input: its output must be
``[1, len(labels)]`` finite logits. A model that fails any step is refused with a
:class:`ModelLoadError` naming the file and the reason; :func:`load_models` keeps serving the
others.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import struct
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ztagent.errors import ConfigError
from ztagent.files import write_atomic
from ztagent.posture.errors import PostureError
from ztagent.posture.firmware import FirmwarePublicKey, sign_bytes, verify_signature
from ztagent.workloads.inference.errors import InvalidInputError, ModelLoadError
from ztagent.workloads.inference.manifest import MANIFEST_SUFFIX, ModelManifest, parse_manifest

log = logging.getLogger(__name__)

MAX_MODEL_BYTES = 256 * 1024 * 1024
MAX_MANIFEST_BYTES = 64 * 1024
BATCH_INVARIANCE_TOLERANCE = 1e-4
"""Largest logit change (relative to the largest logit, at least 1) batching may cause
before a model is run row by row. Float models differ by rounding only (~1e-6)."""


@dataclass(frozen=True)
class BatchOutput:
    """Softmax probabilities, one row per input in order, and the forward pass's wall time."""

    probabilities: list[list[float]]
    elapsed_s: float


class LoadedModel:
    """A verified TorchScript classifier and its manifest.

    ``row_by_row`` is set at load when the model's output for one input depends on the other
    inputs of its batch (dynamically quantized layers pick their activation scale from the
    whole batch): such a model runs each input of a batch on its own, so one caller's input
    never changes another caller's result.
    """

    def __init__(
        self, manifest: ModelManifest, module: torch.jit.ScriptModule, *, row_by_row: bool = False
    ) -> None:
        self.manifest = manifest
        self._module = module
        self.row_by_row = row_by_row
        self.signer: str | None = None
        """Key id of the trusted key that signed the manifest (None: signatures not required)."""

    @property
    def name(self) -> str:
        return self.manifest.name

    def run(self, inputs: Sequence[torch.Tensor]) -> BatchOutput:
        """The batch's softmax probabilities (call it from the worker thread)."""
        with torch.inference_mode():
            start = time.perf_counter()
            logits = self.logits(inputs)
            elapsed = time.perf_counter() - start
            probabilities = torch.softmax(logits.to(torch.float32), dim=1)
        return BatchOutput(probabilities.tolist(), elapsed)

    def logits(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        with torch.inference_mode():
            if self.row_by_row:
                return torch.cat([self._module(row.unsqueeze(0)) for row in inputs])
            out: torch.Tensor = self._module(torch.stack(list(inputs)))
            return out


@dataclass(frozen=True)
class Refusal:
    manifest_path: Path
    error: ModelLoadError


@dataclass(frozen=True)
class LoadedModels:
    models: dict[str, LoadedModel]
    refused: list[Refusal]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_digest(data: bytes, manifest: ModelManifest, path: Path) -> None:
    """Refuses model bytes whose SHA-256 is not the manifest's."""
    got = sha256_hex(data)
    if not hmac.compare_digest(got, manifest.sha256):
        raise ModelLoadError(
            "model_digest_mismatch",
            f"{path}: SHA-256 is {got}, manifest {manifest.name!r} expects {manifest.sha256}; "
            "the model file was modified or replaced, refusing to load it",
        )


def signature_path(manifest_path: Path) -> Path:
    """``x.manifest.json`` -> ``x.manifest.sig`` (the detached signature envelope)."""
    return manifest_path.with_name(manifest_path.name.removesuffix(".json") + ".sig")


def check_signature(
    raw: bytes, manifest_path: Path, trusted_keys: Mapping[str, FirmwarePublicKey]
) -> str:
    """The id of the trusted model-signing key whose signature over the manifest bytes
    verifies; ``ModelLoadError`` (``model_signature_missing``, ``model_bad_signature``)."""
    sig_path = signature_path(manifest_path)
    try:
        signature = _read_limited(sig_path, MAX_MANIFEST_BYTES)
    except ModelLoadError as err:
        raise ModelLoadError(
            "model_signature_missing",
            f"{sig_path}: {err.message}; models must be signed by a trusted key "
            f"({', '.join(sorted(trusted_keys))}): `ztagent model sign`",
        ) from None
    try:
        return verify_signature(
            raw, signature, trusted_keys, f"{manifest_path.name}", label="model signature"
        )
    except PostureError as err:
        raise ModelLoadError("model_bad_signature", f"{sig_path}: {err.message}") from None


def sign_manifest_file(manifest_path: Path, key_path: Path) -> Path:
    """Signs a manifest as it is (bytes unchanged) after checking that it parses and that the
    model file it names has the digest it states; returns the ``.manifest.sig`` written."""
    raw = _read_limited(manifest_path, MAX_MANIFEST_BYTES)
    manifest = parse_manifest(raw, manifest_path)
    model_path = manifest_path.parent / manifest.file
    check_digest(_read_limited(model_path, MAX_MODEL_BYTES), manifest, model_path)
    out = signature_path(manifest_path)
    write_atomic(out, sign_bytes(key_path, raw, "model signing key"))
    return out


def load_model(
    manifest_path: Path, trusted_keys: Mapping[str, FirmwarePublicKey] | None = None
) -> LoadedModel:
    """Reads a manifest and its model file, checks the signature (when ``trusted_keys`` are
    given) and the digest, loads and smoke-tests it."""
    raw = _read_limited(manifest_path, MAX_MANIFEST_BYTES)
    signer = check_signature(raw, manifest_path, trusted_keys) if trusted_keys else None
    manifest = parse_manifest(raw, manifest_path)
    model_path = manifest_path.parent / manifest.file
    data = _read_limited(model_path, MAX_MODEL_BYTES)
    check_digest(data, manifest, model_path)
    try:
        with warnings.catch_warnings():
            # TorchScript is deprecated upstream but remains the serving format of torch 2.13.
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(io.BytesIO(data), map_location="cpu")  # type: ignore[no-untyped-call]
        module.eval()
        with torch.inference_mode():
            out = module(torch.zeros((1, *manifest.input_shape), dtype=torch.float32))
    except Exception as exc:  # torch raises RuntimeError and friends for a bad archive
        raise ModelLoadError(
            "model_invalid", f"{model_path}: not a usable TorchScript model ({exc!s:.300})"
        ) from None
    want = (1, len(manifest.labels))
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelLoadError(
            "model_invalid",
            f"{model_path}: output for one input is {got}, expected {want} "
            f"(one logit per label of {manifest.name!r})",
        )
    if not bool(torch.isfinite(out).all()):
        raise ModelLoadError(
            "model_invalid", f"{model_path}: output for a zero input is not finite"
        )
    model = LoadedModel(manifest, module)
    model.signer = signer
    model.row_by_row = not _batch_invariant(model)
    return model


def _batch_invariant(model: LoadedModel) -> bool:
    """Whether a probe input gets the same logits alone and beside a 10^4 times louder one."""
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(model.manifest.input_shape, generator=gen)
    try:
        alone = model.logits([probe])[0]
        beside = model.logits([probe, 1e4 * probe.flip(-1)])[0]
    except Exception as exc:
        raise ModelLoadError(
            "model_invalid",
            f"{model.manifest.file}: cannot run a batch of two inputs ({exc!s:.300})",
        ) from None
    scale = max(1.0, float(alone.abs().max()))
    return float((alone - beside).abs().max()) <= BATCH_INVARIANCE_TOLERANCE * scale


def load_models(
    models_dir: Path, trusted_keys: Mapping[str, FirmwarePublicKey] | None = None
) -> LoadedModels:
    """Every ``*.manifest.json`` in ``models_dir`` (sorted); refusals are logged and kept.
    With ``trusted_keys`` every manifest must carry a signature by one of them."""
    if not models_dir.is_dir():
        raise ConfigError("models", f"{models_dir} is not a directory (run `make model`)")
    models: dict[str, LoadedModel] = {}
    refused: list[Refusal] = []
    for manifest_path in sorted(models_dir.glob(f"*{MANIFEST_SUFFIX}")):
        try:
            model = load_model(manifest_path, trusted_keys)
            if model.name in models:
                raise ModelLoadError(
                    "duplicate_model",
                    f"{manifest_path}: model {model.name!r} is already served from "
                    f"{models[model.name].manifest.file}",
                )
        except ModelLoadError as err:
            log.error("model refused: %s", err.message)
            refused.append(Refusal(manifest_path, err))
            continue
        log.info(
            "model %s %s loaded (sha256 %s, signed by %s, critical=%s, %s)",
            model.name,
            model.manifest.version,
            model.manifest.sha256,
            model.signer or "nobody (no --model-keys)",
            model.manifest.critical,
            "row by row: not batch-invariant" if model.row_by_row else "batched",
        )
        models[model.name] = model
    return LoadedModels(models, refused)


def decode_tensor(data: bytes, shape: Sequence[int]) -> torch.Tensor:
    """Packed little-endian float32 bytes (already checked by ``check_tensor``) as a tensor.

    Raises InvalidInputError for NaN or infinite values, naming the first one's index.
    """
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if sys.byteorder != "little":
        raw = raw.view(-1, 4).flip(1).reshape(-1)
    tensor = raw.view(torch.float32).reshape(tuple(shape))
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        flat = int(torch.nonzero(~finite.reshape(-1))[0, 0])
        index = list(_unravel(flat, shape))
        value = float(tensor.reshape(-1)[flat])
        raise InvalidInputError(
            "non_finite",
            f"tensor value at index {index} is {value}; expected only finite float32 values "
            "(no NaN or infinity)",
        )
    return tensor


def _unravel(flat: int, shape: Sequence[int]) -> tuple[int, ...]:
    index = []
    for dim in reversed(shape):
        flat, rest = divmod(flat, dim)
        index.append(rest)
    return tuple(reversed(index))


def _read_limited(path: Path, limit: int) -> bytes:
    try:
        with path.open("rb") as fh:
            data = fh.read(limit + 1)
    except FileNotFoundError:
        raise ModelLoadError("model_file_missing", f"{path}: no such file") from None
    except OSError as exc:
        raise ModelLoadError(
            "model_file_missing", f"{path}: cannot read ({exc.strerror})"
        ) from None
    if len(data) > limit:
        raise ModelLoadError("model_invalid", f"{path}: larger than {limit} bytes")
    return data


def encode_tensor(tensor: torch.Tensor) -> tuple[list[int], bytes]:
    """A tensor's shape and packed little-endian float32 bytes: what a client sends."""
    values = tensor.to(torch.float32).reshape(-1).tolist()
    return list(tensor.shape), struct.pack(f"<{len(values)}f", *values)
