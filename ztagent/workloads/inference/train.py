"""``python -m ztagent.workloads.inference.train --out var/models [--seed 0]``: the shipped model.

Trains a small 1-D CNN on synthetic vibration/temperature windows (``sensors.py``), reports
its held-out accuracy, and exports two TorchScript files with their manifests:

``vibration-anomaly``       float32; marked critical (policy: verified posture required)
``vibration-anomaly-int8``  the same network with its Linear layers dynamically quantized to
                            int8 (``torch.ao.quantization.quantize_dynamic``); not critical

Then it prints accuracy, file size and single-sample latency of both. The same seed gives
the same data and the same weights (training runs on one thread for that reason).
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ztagent.files import write_atomic
from ztagent.workloads.inference.manifest import MANIFEST_SUFFIX, ModelManifest
from ztagent.workloads.inference.models import sha256_hex
from ztagent.workloads.inference.sensors import CHANNELS, INPUT_SHAPE, LABELS, generate_windows

FLOAT_NAME = "vibration-anomaly"
INT8_NAME = "vibration-anomaly-int8"
MODEL_VERSION = "1.0.0"
CRITICAL_MODEL = FLOAT_NAME

TRAIN_WINDOWS = 6000
HELDOUT_WINDOWS = 2000
HELDOUT_SEED_OFFSET = 1_000_003
"""The held-out set comes from seed + this offset: windows the training never saw."""
EPOCHS = 12
BATCH = 64
LEARNING_RATE = 3e-3


class SensorNet(nn.Module):
    """Per-channel normalisation (fixed at training), two conv blocks, a small MLP head.

    Inputs are raw units (g, degrees C), shape ``[batch, 3, 64]``; outputs are logits.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.reshape(1, CHANNELS, 1).clone())
        self.register_buffer("std", std.reshape(1, CHANNELS, 1).clone())
        self.features = nn.Sequential(
            nn.Conv1d(CHANNELS, 16, kernel_size=7, padding=3),
            nn.ReLU(),
            nn.MaxPool1d(2),
            nn.Conv1d(16, 32, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool1d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * (INPUT_SHAPE[1] // 4), 64),
            nn.ReLU(),
            nn.Linear(64, len(LABELS)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # mypy sees buffers as Tensor | Module; TorchScript cannot read a class annotation here
        x = (x - self.mean) / self.std  # type: ignore[operator]
        out: torch.Tensor = self.head(self.features(x))
        return out


@dataclass(frozen=True)
class Variant:
    name: str
    path: Path
    manifest_path: Path
    accuracy: float
    size_bytes: int
    latency_ms: float


def heldout(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out windows and labels for a training seed."""
    return generate_windows(HELDOUT_WINDOWS, seed + HELDOUT_SEED_OFFSET)


def train_model(seed: int, *, epochs: int = EPOCHS, windows: int = TRAIN_WINDOWS) -> SensorNet:
    """A trained float model (eval mode); deterministic for a seed on one thread."""
    torch.manual_seed(seed)
    x, y = generate_windows(windows, seed)
    mean = x.mean(dim=(0, 2))
    std = x.std(dim=(0, 2)).clamp_min(1e-3)
    model = SensorNet(mean, std)
    optimiser = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    loss_fn = nn.CrossEntropyLoss()
    order_gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(windows, generator=order_gen)
        for start in range(0, windows, BATCH):
            idx = order[start : start + BATCH]
            optimiser.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            optimiser.step()
    return model.eval()


def quantize(model: nn.Module) -> nn.Module:
    """Linear layers to int8 with dynamic activation quantization (weights 4x smaller)."""
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated upstream in favour of torchao; it is what the
        # pinned torch 2.13 ships, and the exported TorchScript does not depend on it.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation.*")
        quantized: nn.Module = torch.ao.quantization.quantize_dynamic(  # type: ignore[no-untyped-call]
            model, {nn.Linear}, dtype=torch.qint8
        )
    return quantized


def accuracy(module: nn.Module | torch.jit.ScriptModule, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.inference_mode():
        predicted = module(x).argmax(dim=1)
    return float((predicted == y).float().mean())


def single_sample_latency_ms(module: torch.jit.ScriptModule, runs: int = 200) -> float:
    """Median wall time of one forward pass over one window, in milliseconds."""
    sample = torch.zeros((1, *INPUT_SHAPE))
    times = []
    with torch.inference_mode():
        for _ in range(20):
            module(sample)
        for _ in range(runs):
            start = time.perf_counter()
            module(sample)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def export(
    module: nn.Module,
    out: Path,
    name: str,
    *,
    critical: bool,
    description: str,
    metrics: dict[str, object],
) -> tuple[Path, Path, torch.jit.ScriptModule]:
    """Writes ``<name>.pt`` (TorchScript) and ``<name>.manifest.json``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript: see models.py
        scripted = torch.jit.script(module)
        model_path = out / f"{name}.pt"
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)
        write_atomic(model_path, buffer.getvalue())  # 0644, never through a symlink
    manifest = ModelManifest(
        name=name,
        version=MODEL_VERSION,
        file=model_path.name,
        sha256=sha256_hex(model_path.read_bytes()),
        input_shape=INPUT_SHAPE,
        labels=LABELS,
        critical=critical,
        description=description,
        metrics=metrics,
    )
    manifest_path = out / f"{name}{MANIFEST_SUFFIX}"
    write_atomic(manifest_path, manifest.to_json())
    return model_path, manifest_path, scripted


def build(
    out: Path, seed: int = 0, *, epochs: int = EPOCHS, windows: int = TRAIN_WINDOWS
) -> list[Variant]:
    """Trains, exports both variants into ``out`` and measures them."""
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # determinism: the same seed gives the same weights
    try:
        model = train_model(seed, epochs=epochs, windows=windows)
    finally:
        torch.set_num_threads(threads)
    x, y = heldout(seed)
    variants = []
    for name, module, critical, what in (
        (FLOAT_NAME, model, True, "float32"),
        (INT8_NAME, quantize(model), False, "int8 dynamically quantized Linear layers"),
    ):
        acc = accuracy(module, x, y)
        metrics: dict[str, object] = {
            "heldout_accuracy": round(acc, 4),
            "heldout_windows": len(y),
            "seed": seed,
        }
        description = (
            f"1-D CNN over 3x64 vibration (g, X/Y) and temperature (C) windows at 1 kHz, "
            f"classes {list(LABELS)}; {what}"
        )
        model_path, manifest_path, scripted = export(
            module, out, name, critical=critical, description=description, metrics=metrics
        )
        variants.append(
            Variant(
                name,
                model_path,
                manifest_path,
                acc,
                model_path.stat().st_size,
                single_sample_latency_ms(scripted),
            )
        )
    return variants


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ztagent.workloads.inference.train",
        description="Train the shipped vibration-anomaly classifier on synthetic sensor data.",
    )
    parser.add_argument("--out", type=Path, default=Path("var/models"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    variants = build(args.out, args.seed, epochs=args.epochs)
    print(f"trained on {TRAIN_WINDOWS} windows, seed {args.seed}, {args.epochs} epochs")
    print(f"{'model':<24} {'held-out acc':>12} {'size':>10} {'latency (1 window)':>19}")
    for v in variants:
        print(
            f"{v.name:<24} {v.accuracy:>11.2%} {v.size_bytes / 1024:>7.1f} KiB "
            f"{v.latency_ms:>15.3f} ms"
        )
    for v in variants:
        print(f"wrote {v.path} and {v.manifest_path}")
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
