"""Rotary position embeddings: read the rope settings from an HF config and build cos/sin tables.

The tables are computed once, in float32, for every position up to the model's maximum; a step
then only indexes them by its token positions (no trigonometry per step).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    """Rope settings for one model. ``rotary_dim`` may be smaller than the head dim (partial
    rotary); the remaining dims pass through unrotated."""

    theta: float
    rotary_dim: int
    max_position: int
    rope_type: str = "default"
    factor: float = 1.0
    # llama3 only
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope_type must be one of {SUPPORTED_ROPE_TYPES}, got {self.rope_type!r}")
        if self.rotary_dim <= 0 or self.rotary_dim % 2:
            raise ValueError(f"rotary_dim must be a positive even number, got {self.rotary_dim}")
        if self.factor <= 0:
            raise ValueError(f"rope factor must be > 0, got {self.factor}")


def rope_config_from_hf(config, head_dim: int, max_position: int) -> RopeConfig:
    """Reads theta and scaling from an HF config. transformers 5 keeps them in
    ``config.rope_parameters``; older configs use ``rope_theta`` and ``rope_scaling``."""
    params = dict(getattr(config, "rope_scaling", None) or {})
    params.update(getattr(config, "rope_parameters", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0)
    return RopeConfig(
        theta=float(theta),
        rotary_dim=int(head_dim * partial),
        max_position=max_position,
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0) or 1.0),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position=int(params.get("original_max_position_embeddings", 8192)),
    )


def inverse_frequencies(rc: RopeConfig) -> torch.Tensor:
    """Float32 [rotary_dim // 2] rotation speeds, with the config's scaling applied."""
    # Explicit CPU device: models are built under a meta-device context, the tables must be real.
    exponents = torch.arange(0, rc.rotary_dim, 2, dtype=torch.int64, device="cpu").float() / rc.rotary_dim
    inv_freq = 1.0 / (rc.theta**exponents)
    if rc.rope_type == "linear":
        return inv_freq / rc.factor
    if rc.rope_type == "llama3":
        return _llama3_scale(inv_freq, rc)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, rc: RopeConfig) -> torch.Tensor:
    # Long wavelengths are slowed by `factor`, short ones kept, and the band between the two
    # thresholds is interpolated linearly in (context length / wavelength).
    low_freq_wavelen = rc.original_max_position / rc.low_freq_factor
    high_freq_wavelen = rc.original_max_position / rc.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rc.factor, inv_freq)
    smooth = (rc.original_max_position / wavelen - rc.low_freq_factor) / (rc.high_freq_factor - rc.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rc.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryTables:
    """cos/sin tables ``[max_position, rotary_dim // 2]`` in float32 on ``device``.

    Deliberately a plain object, not module buffers: casting the model to bf16 must not round
    the angles, and materialising a meta-device model must not wipe them.
    """

    def __init__(self, rc: RopeConfig, device: torch.device | str):
        inv_freq = inverse_frequencies(rc)
        positions = torch.arange(rc.max_position, dtype=torch.float32, device="cpu")
        angles = torch.outer(positions, inv_freq)
        self.config = rc
        self.cos = angles.cos().to(device)
        self.sin = angles.sin().to(device)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each [T, rotary_dim // 2], for token positions [T]."""
        return self.cos[positions], self.sin[positions]
