"""Training, export, loading with digest checks, decoding, and the int8 variant's agreement.

One small model pair is trained per module (3 epochs on 2,000 windows, about 2 s); the
agreement test uses the held-out windows of the same seed, which training never saw.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import pytest

from tests.fixtures.ci import require_module

torch = require_module("torch")

from ztagent.cli import main as cli_main  # noqa: E402
from ztagent.errors import ConfigError  # noqa: E402
from ztagent.posture.firmware import (  # noqa: E402
    FirmwarePublicKey,
    generate_firmware_key,
    load_trusted_keys,
)
from ztagent.workloads.inference.errors import (  # noqa: E402
    InvalidInputError,
    ModelHeaderRequiredError,
)
from ztagent.workloads.inference.manifest import ModelManifest, parse_manifest  # noqa: E402
from ztagent.workloads.inference.models import (  # noqa: E402
    ModelLoadError,
    decode_tensor,
    encode_tensor,
    load_model,
    load_models,
    sha256_hex,
    signature_path,
)
from ztagent.workloads.inference.sensors import (  # noqa: E402
    EXAMPLE_KINDS,
    INPUT_SHAPE,
    LABELS,
    example_window,
    generate_windows,
)
from ztagent.workloads.inference.server import (  # noqa: E402
    InferenceOptions,
    check_model_binding,
    model_header,
)
from ztagent.workloads.inference.train import (  # noqa: E402
    FLOAT_NAME,
    INT8_NAME,
    build,
    heldout,
    train_model,
)

SEED = 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models")
    build(out, SEED, epochs=3, windows=2000)
    return out


@pytest.fixture
def models_dir(trained: Path, tmp_path: Path) -> Path:
    """A private copy, so a test may tamper with it."""
    return Path(shutil.copytree(trained, tmp_path / "models"))


def manifest_path(directory: Path, name: str) -> Path:
    return directory / f"{name}.manifest.json"


# -- synthetic data and training -----------------------------------------------------------


def test_windows_are_deterministic_and_balanced() -> None:
    x1, y1 = generate_windows(400, 5)
    x2, y2 = generate_windows(400, 5)
    assert x1.shape == (400, *INPUT_SHAPE)
    assert x1.dtype == torch.float32
    assert torch.equal(x1, x2)
    assert torch.equal(y1, y2)
    assert torch.bincount(y1).tolist() == [100] * len(LABELS)
    assert not torch.equal(generate_windows(400, 6)[0], x1)
    assert bool(torch.isfinite(x1).all())


def test_class_signatures() -> None:
    x, y = generate_windows(2000, 1)
    temp = x[:, 2].mean(dim=1)
    assert temp[y == 3].mean() > temp[y == 0].mean() + 10  # overheating runs hot
    vib = x[:, 0].std(dim=1)
    assert vib[y == 1].mean() > 1.5 * vib[y == 0].mean()  # imbalance shakes more


def test_training_is_deterministic() -> None:
    a = train_model(3, epochs=1, windows=400).state_dict()
    b = train_model(3, epochs=1, windows=400).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_build_writes_both_manifests(trained: Path) -> None:
    for name, critical in ((FLOAT_NAME, True), (INT8_NAME, False)):
        manifest = parse_manifest(manifest_path(trained, name).read_bytes(), Path(name))
        assert manifest.critical is critical
        assert manifest.labels == LABELS
        assert manifest.input_shape == INPUT_SHAPE
        assert manifest.sha256 == sha256_hex((trained / manifest.file).read_bytes())
        assert manifest.metrics["heldout_windows"] == 2000
        assert manifest.metrics["heldout_accuracy"] > 0.9
    assert (trained / f"{INT8_NAME}.pt").stat().st_size < (
        trained / f"{FLOAT_NAME}.pt"
    ).stat().st_size


def test_int8_agrees_with_float_on_heldout(trained: Path) -> None:
    fp = load_model(manifest_path(trained, FLOAT_NAME))
    q8 = load_model(manifest_path(trained, INT8_NAME))
    x, y = heldout(SEED)
    fp_labels = torch.tensor(fp.run(list(x)).probabilities).argmax(dim=1)
    q8_labels = torch.tensor(q8.run(list(x)).probabilities).argmax(dim=1)
    agreement = float((fp_labels == q8_labels).float().mean())
    assert agreement >= 0.98, agreement
    assert float((fp_labels == y).float().mean()) > 0.9


def test_example_windows() -> None:
    for kind in EXAMPLE_KINDS:
        assert example_window(kind).shape == INPUT_SHAPE
    with pytest.raises(ValueError, match="expected one of"):
        example_window("broken")


# -- loading: digest, file, output shape ---------------------------------------------------


def test_load_models_serves_both(models_dir: Path) -> None:
    loaded = load_models(models_dir)
    assert sorted(loaded.models) == [FLOAT_NAME, INT8_NAME]
    assert loaded.refused == []
    # dynamic int8 picks its activation scale per batch: it runs row by row, float batches
    assert loaded.models[INT8_NAME].row_by_row
    assert not loaded.models[FLOAT_NAME].row_by_row


def test_row_by_row_keeps_each_input_its_own(trained: Path) -> None:
    x, _ = heldout(SEED)
    for name in (FLOAT_NAME, INT8_NAME):
        model = load_model(manifest_path(trained, name))
        alone = torch.tensor([model.run([row]).probabilities[0] for row in x[:16]])
        batched = torch.tensor(model.run(list(x[:16])).probabilities)
        if model.row_by_row:
            assert torch.equal(alone, batched)
        else:  # float: batching changes rounding only
            assert torch.allclose(alone, batched, atol=1e-5, rtol=0)


def tamper(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_tampered_model_is_refused_others_still_served(models_dir: Path) -> None:
    tamper(models_dir / f"{INT8_NAME}.pt")
    loaded = load_models(models_dir)
    assert list(loaded.models) == [FLOAT_NAME]
    [refusal] = loaded.refused
    assert refusal.manifest_path == manifest_path(models_dir, INT8_NAME)
    assert refusal.error.code == "model_digest_mismatch"
    with pytest.raises(ModelLoadError, match=r"SHA-256 is [0-9a-f]{64}, manifest") as info:
        load_model(manifest_path(models_dir, INT8_NAME))
    assert "was modified or replaced, refusing to load it" in info.value.message


def test_replaced_model_is_refused(models_dir: Path) -> None:
    """Swapping in the other (valid) model file under this manifest is caught too."""
    shutil.copy(models_dir / f"{FLOAT_NAME}.pt", models_dir / f"{INT8_NAME}.pt")
    with pytest.raises(ModelLoadError, match="model_digest_mismatch"):
        load_model(manifest_path(models_dir, INT8_NAME))


def rewrite_manifest(directory: Path, name: str, **changes: object) -> Path:
    path = manifest_path(directory, name)
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))
    return path


def test_missing_model_file(models_dir: Path) -> None:
    (models_dir / f"{FLOAT_NAME}.pt").unlink()
    with pytest.raises(ModelLoadError, match=r"model_file_missing: .*: no such file"):
        load_model(manifest_path(models_dir, FLOAT_NAME))


def test_garbage_with_matching_digest_is_not_a_model(models_dir: Path) -> None:
    (models_dir / "junk.pt").write_bytes(b"not a zip")
    path = rewrite_manifest(models_dir, FLOAT_NAME, file="junk.pt", sha256=sha256_hex(b"not a zip"))
    with pytest.raises(ModelLoadError, match=r"model_invalid: .*not a usable TorchScript model"):
        load_model(path)


def test_output_must_match_labels(models_dir: Path) -> None:
    path = rewrite_manifest(models_dir, FLOAT_NAME, labels=["a", "b", "c"])
    with pytest.raises(
        ModelLoadError, match=r"output for one input is \(1, 4\), expected \(1, 3\)"
    ):
        load_model(path)


def test_input_shape_must_fit_the_model(models_dir: Path) -> None:
    path = rewrite_manifest(models_dir, FLOAT_NAME, input_shape=[3, 10])
    with pytest.raises(ModelLoadError, match="model_invalid"):
        load_model(path)


def test_duplicate_names_refused(models_dir: Path) -> None:
    shutil.copy(manifest_path(models_dir, FLOAT_NAME), models_dir / "again.manifest.json")
    loaded = load_models(models_dir)
    assert sorted(loaded.models) == [FLOAT_NAME, INT8_NAME]
    assert [r.error.code for r in loaded.refused] == ["duplicate_model"]


def test_models_dir_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"models: .* is not a directory"):
        load_models(tmp_path / "absent")


# -- decoding ------------------------------------------------------------------------------


def test_encode_decode_round_trip() -> None:
    window = example_window("normal")
    shape, data = encode_tensor(window)
    assert shape == [3, 64]
    assert data[:4] == struct.pack("<f", float(window[0, 0]))  # little-endian on the wire
    assert torch.equal(decode_tensor(data, shape), window)


@pytest.mark.parametrize(
    ("bad", "shown"), [(math.nan, "nan"), (math.inf, "inf"), (-math.inf, "-inf")]
)
def test_decode_refuses_non_finite(bad: float, shown: str) -> None:
    values = [0.0] * 192
    values[64 + 5] = bad
    with pytest.raises(InvalidInputError, match="non_finite") as info:
        decode_tensor(struct.pack("<192f", *values), [3, 64])
    assert info.value.message.startswith(f"tensor value at index [1, 5] is {shown};")


# -- request binding and options -----------------------------------------------------------


def manifest(critical: bool) -> ModelManifest:
    return ModelManifest("m", "1", "m.pt", "ab" * 32, (3,), ("a", "b"), critical)


class _Model:
    def __init__(self, critical: bool) -> None:
        self.manifest = manifest(critical)
        self.name = "m"


def test_model_header() -> None:
    assert model_header(None) is None
    assert model_header([("x-model", "m"), ("other", "x")]) == "m"
    with pytest.raises(InvalidInputError, match="got 2 x-model values"):
        model_header([("x-model", "m"), ("x-model", "n")])


def test_model_binding() -> None:
    check_model_binding(_Model(critical=False), None)  # type: ignore[arg-type]
    check_model_binding(_Model(critical=True), "m")  # type: ignore[arg-type]
    with pytest.raises(ModelHeaderRequiredError, match="model 'm' is critical: name it in"):
        check_model_binding(_Model(critical=True), None)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="x-model metadata names 'other' but the request"):
        check_model_binding(_Model(critical=False), "other")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "key"),
    [
        (InferenceOptions(confidence_threshold=1.5), "confidence_threshold"),
        (InferenceOptions(max_batch=0), "max_batch"),
        (InferenceOptions(max_wait_ms=-1), "max_wait_ms"),
        (InferenceOptions(threads=0), "threads"),
    ],
)
def test_options_refused(options: InferenceOptions, key: str) -> None:
    with pytest.raises(ConfigError, match=f"^config_invalid: {key}: got ") as info:
        options.check()
    assert info.value.key == key


# -- signed manifests ------------------------------------------------------------------------


def _publisher(tmp_path: Path, name: str) -> tuple[Path, dict[str, FirmwarePublicKey]]:
    private, public = generate_firmware_key(tmp_path / "keys", name)
    return private, load_trusted_keys([public], "model_keys")


def test_signed_manifests_load_with_their_signer(models_dir: Path, tmp_path: Path) -> None:
    key, trusted = _publisher(tmp_path, "publisher")
    manifests = [manifest_path(models_dir, n) for n in (FLOAT_NAME, INT8_NAME)]
    assert cli_main(["model", "sign", *map(str, manifests), "--key", str(key)]) == 0
    loaded = load_models(models_dir, trusted)
    assert sorted(loaded.models) == sorted([FLOAT_NAME, INT8_NAME]) and not loaded.refused
    assert {m.signer for m in loaded.models.values()} == set(trusted)


def test_unsigned_resigned_or_edited_manifests_are_refused(
    models_dir: Path, tmp_path: Path
) -> None:
    key, trusted = _publisher(tmp_path, "publisher")
    rogue, _ = _publisher(tmp_path, "rogue")
    path = manifest_path(models_dir, FLOAT_NAME)
    with pytest.raises(ModelLoadError, match=r"^model_signature_missing: .*manifest.sig"):
        load_model(path, trusted)

    # signed by a key the workload does not trust
    assert cli_main(["model", "sign", str(path), "--key", str(rogue)]) == 0
    with pytest.raises(ModelLoadError, match=r"^model_bad_signature: .*signed by key"):
        load_model(path, trusted)

    # the attack the signature stops: model and manifest swapped together after signing
    assert cli_main(["model", "sign", str(path), "--key", str(key)]) == 0
    assert load_model(path, trusted).signer in trusted
    shutil.copy(models_dir / f"{INT8_NAME}.pt", models_dir / f"{FLOAT_NAME}.pt")
    rewrite_manifest(
        models_dir, FLOAT_NAME, sha256=sha256_hex((models_dir / f"{INT8_NAME}.pt").read_bytes())
    )
    with pytest.raises(ModelLoadError, match=r"^model_bad_signature: .*does not verify"):
        load_model(path, trusted)
    assert load_model(path).name == FLOAT_NAME  # without keys only the digest is checked


def test_model_sign_refuses_a_manifest_that_does_not_match_its_model(models_dir: Path) -> None:
    tamper(models_dir / f"{INT8_NAME}.pt")
    key, _ = generate_firmware_key(models_dir.parent / "k", "publisher")
    path = manifest_path(models_dir, INT8_NAME)
    assert cli_main(["model", "sign", str(path), "--key", str(key)]) == 1
    assert not signature_path(path).exists()
