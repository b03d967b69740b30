"""Synthetic vibration and temperature windows from a rotating machine, for the shipped model.

A window is 3 channels x 64 samples at 1 kHz (64 ms): two accelerometer axes (X, Y, in g,
mounted 90 degrees apart on the bearing housing) and the housing temperature (degrees C).
Every window draws its own machine: shaft speed 25-60 Hz, vibration level, sensor noise,
ambient temperature and drift. The four classes follow the textbook signatures:

``normal``
    1x shaft-speed sinusoid with a weaker 2x harmonic, the two axes roughly in phase and
    unequal (the housing is stiffer in one direction), temperature 35-62 C drifting slowly.
``imbalance``
    a heavy spot on the rotor: the 1x component grows 1.4-4x and the orbit turns circular,
    so X and Y carry equal 1x amplitude 90 degrees apart.
``bearing_fault``
    an outer-race defect: impulses at the ball-pass frequency (3-5.5x shaft speed), each
    ringing the housing resonance (180-320 Hz) and decaying within a few milliseconds.
``overheating``
    failing lubrication or cooling: temperature 58-95 C and rising fast; vibration stays
    close to normal.

Mild cases overlap normal ones (a slightly imbalanced rotor, a warm but healthy machine), so
the classifier is not always sure: those are the results the workload escalates. Everything
comes from a seeded :class:`torch.Generator`: the same seed gives the same windows.
"""

from __future__ import annotations

import math

import torch

LABELS = ("normal", "imbalance", "bearing_fault", "overheating")
CHANNELS = 3
SAMPLES = 64
SAMPLE_RATE_HZ = 1000.0
INPUT_SHAPE = (CHANNELS, SAMPLES)


def _uniform(gen: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, 1, generator=gen)


def generate_windows(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` windows (float32, shape ``[n, 3, 64]``) and their class indices into LABELS.

    Classes are balanced (``n`` rounded down to a multiple of 4 per class, then shuffled).
    """
    if n < len(LABELS):
        raise ValueError(f"got n={n}, expected at least {len(LABELS)} (one window per class)")
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(LABELS)
    labels = labels[torch.randperm(n, generator=gen)]
    t = torch.arange(SAMPLES, dtype=torch.float64).unsqueeze(0) / SAMPLE_RATE_HZ  # [1, S]

    shaft_hz = _uniform(gen, n, 25.0, 60.0)
    level = _uniform(gen, n, 0.15, 0.4)  # 1x amplitude, g
    phase = _uniform(gen, n, 0.0, 2 * math.pi)
    h2 = _uniform(gen, n, 0.1, 0.35) * level  # 2x harmonic amplitude
    h2_phase = _uniform(gen, n, 0.0, 2 * math.pi)
    y_gain = _uniform(gen, n, 0.55, 0.95)  # anisotropic housing
    y_lag = _uniform(gen, n, -0.5, 0.5)  # rad, roughly in phase
    noise = _uniform(gen, n, 0.02, 0.06)
    ambient = _uniform(gen, n, 35.0, 62.0)
    drift = _uniform(gen, n, -20.0, 40.0)  # C per second: slow

    is_imb = (labels == 1).unsqueeze(1)
    is_brg = (labels == 2).unsqueeze(1)
    is_hot = (labels == 3).unsqueeze(1)

    # Imbalance: larger 1x, circular orbit (equal amplitude, 90 degrees apart).
    severity = _uniform(gen, n, 1.4, 4.0)
    level = torch.where(is_imb, level * severity, level)
    y_gain = torch.where(is_imb, _uniform(gen, n, 0.85, 1.1), y_gain)
    y_lag = torch.where(is_imb, math.pi / 2 + _uniform(gen, n, -0.35, 0.35), y_lag)

    w = 2 * math.pi * shaft_hz * t
    x_sig = level * torch.sin(w + phase) + h2 * torch.sin(2 * w + h2_phase)
    y_sig = y_gain * level * torch.sin(w + phase - y_lag) + 0.8 * h2 * torch.cos(2 * w + h2_phase)

    # Bearing fault: impulses at the ball-pass frequency, each ringing the housing resonance.
    bpf = shaft_hz * _uniform(gen, n, 3.0, 5.5)
    resonance = _uniform(gen, n, 180.0, 320.0)
    impact = _uniform(gen, n, 0.25, 0.9)
    decay_s = _uniform(gen, n, 0.0015, 0.004)
    since = torch.remainder(t + _uniform(gen, n, 0.0, 0.02), 1.0 / bpf)  # time since last hit
    ringing = impact * torch.exp(-since / decay_s) * torch.sin(2 * math.pi * resonance * since)
    x_sig = torch.where(is_brg, x_sig + ringing, x_sig)
    y_sig = torch.where(is_brg, y_sig + 0.7 * ringing, y_sig)

    # Overheating: hot and climbing.
    ambient = torch.where(is_hot, _uniform(gen, n, 58.0, 95.0), ambient)
    drift = torch.where(is_hot, _uniform(gen, n, 30.0, 150.0), drift)
    temp = ambient + drift * t

    x_sig = x_sig + noise * torch.randn(n, SAMPLES, generator=gen, dtype=torch.float64)
    y_sig = y_sig + noise * torch.randn(n, SAMPLES, generator=gen, dtype=torch.float64)
    temp = temp + 0.15 * torch.randn(n, SAMPLES, generator=gen, dtype=torch.float64)
    windows = torch.stack((x_sig, y_sig, temp), dim=1).to(torch.float32)
    return windows, labels


EXAMPLE_KINDS = LABELS


def example_window(kind: str, seed: int = 0) -> torch.Tensor:
    """One ``[3, 64]`` window of a class, for demos. How sure a model is about it depends on
    its trained weights (which differ between CPUs): find uncertain windows through the model
    that is served, never by assuming its answer."""
    if kind not in EXAMPLE_KINDS:
        raise ValueError(f"got kind {kind!r}, expected one of {list(EXAMPLE_KINDS)}")
    windows, labels = generate_windows(4 * len(LABELS), seed)
    return windows[int(torch.nonzero(labels == LABELS.index(kind))[0, 0])].clone()
