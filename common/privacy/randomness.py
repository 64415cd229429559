"""Where the randomness of a DP mechanism comes from: the OS CSPRNG at the site, never a seed
that another party knows.

DP-SGD's guarantee against the coordinator rests on two secrets: which records each step drew
(Poisson sampling) and the Gaussian noise added to their clipped gradients. If either follows
from the round plan, the coordinator can replay it and the guarantee is void. Every draw here
takes a fresh 256-bit key from `os.urandom` and expands it with ChaCha20 (the `cryptography`
package), so nothing another party holds predicts it and no two draws share a key.

What this gives and does not (docs/privacy-officer-guide.md has the longer account):
- the keystream is a CSPRNG; Gaussian noise is drawn by Box-Muller in float64 from 53-bit
  uniforms, four samples summed and halved as Opacus' `secure_mode` does (Holohan and Braghin,
  arXiv:2107.10138), which raises the cost of floating-point attacks on the sampler;
- it is not Opacus' `secure_mode` (torchcsprng has no build here), and floating-point
  representation attacks are mitigated, not ruled out by construction.

`MechanismRandomness.reproducible` exists for research simulations only: it derives every draw
from a label (plan seed, site, round), logs a warning on every use, and a deployed site never
builds one.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from typing import Final

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

logger = logging.getLogger(__name__)

KEY_BYTES: Final[int] = 32
UNIFORM_BITS: Final[int] = 53  # a float64 mantissa: every uniform is k / 2**53
REPRODUCIBLE_DOMAIN: Final[bytes] = b"fedrad insecure-reproducible mechanism randomness v1"
INSECURE_WARNING: Final[str] = (
    "INSECURE REPRODUCIBLE RANDOMNESS: DP noise and sampling for %s follow from the plan seed; "
    "anyone who knows the plan can replay them. Simulation only."
)


class MechanismRandomness:
    """The random draws of one site's DP mechanisms: uniforms, Bernoulli masks, Gaussians.

    The default is secure: every call keys a new ChaCha20 stream from `os.urandom`. Built with
    `reproducible(label)` it keys each call from a hash of the label and a call counter
    instead, so a simulation can be rerun draw for draw (and anyone with the label can too).
    """

    def __init__(self) -> None:
        self._label: bytes | None = None
        self._calls = 0

    @classmethod
    def reproducible(cls, label: str) -> MechanismRandomness:
        """Draws derived from `label`: for research reruns only, loudly logged."""
        randomness = cls()
        randomness._label = label.encode("utf-8")
        logger.warning(INSECURE_WARNING, label)
        return randomness

    @property
    def is_secure(self) -> bool:
        return self._label is None

    def _key(self) -> bytes:
        if self._label is None:
            return os.urandom(KEY_BYTES)
        self._calls += 1
        counter = self._calls.to_bytes(8, "little")
        return hashlib.sha256(REPRODUCIBLE_DOMAIN + b"\0" + self._label + b"\0" + counter).digest()

    def random_bytes(self, count: int) -> bytes:
        """`count` bytes of a ChaCha20 keystream under a fresh key."""
        if count < 0:
            raise ValueError("count must be >= 0")
        encryptor = Cipher(algorithms.ChaCha20(self._key(), bytes(16)), mode=None).encryptor()
        return encryptor.update(bytes(count))

    def uniform(self, count: int) -> torch.Tensor:
        """`count` float64 values uniform on [0, 1), each a multiple of 2**-53."""
        if count == 0:
            return torch.zeros(0, dtype=torch.float64)
        words = torch.frombuffer(bytearray(self.random_bytes(8 * count)), dtype=torch.int64)
        mantissa = (words >> (64 - UNIFORM_BITS)) & ((1 << UNIFORM_BITS) - 1)
        return mantissa.to(torch.float64) * (2.0**-UNIFORM_BITS)

    def bernoulli(self, count: int, probability: float) -> torch.Tensor:
        """A bool mask of `count` independent draws, each True with `probability`."""
        if not 0 <= probability <= 1:
            raise ValueError(f"probability must be in [0, 1], got {probability}")
        return self.uniform(count) < probability

    def standard_normal(self, count: int) -> torch.Tensor:
        """`count` float64 N(0, 1) values: Box-Muller pairs, four summed and halved."""
        if count == 0:
            return torch.zeros(0, dtype=torch.float64)
        pairs = 2 * count  # four normals per value, two per Box-Muller pair
        u = self.uniform(2 * pairs)
        radius = torch.sqrt(-2.0 * torch.log1p(-u[:pairs]))  # 1 - u is in (0, 1]
        angle = (2.0 * math.pi) * u[pairs:]
        normals = torch.cat((radius * torch.cos(angle), radius * torch.sin(angle)))
        return normals.view(4, count).sum(dim=0) / 2.0

    def gaussian(self, count: int, std: float) -> torch.Tensor:
        """`count` float64 N(0, std^2) values (zeros, drawing nothing, at std 0)."""
        if std < 0 or not math.isfinite(std):
            raise ValueError(f"std must be finite and >= 0, got {std}")
        if std == 0:
            return torch.zeros(count, dtype=torch.float64)
        return self.standard_normal(count) * std

    def gaussian_array(self, shape: tuple[int, ...], std: float, dtype: object) -> np.ndarray:
        """N(0, std^2) noise as a numpy array (the coordinator's central-DP noise)."""
        return self.gaussian(math.prod(shape), std).numpy().reshape(shape).astype(dtype)

    def gaussian_like(self, reference: torch.Tensor, std: float) -> torch.Tensor:
        """N(0, std^2) noise with `reference`'s shape, dtype and device."""
        noise = self.gaussian(reference.numel(), std).view(reference.shape)
        return noise.to(device=reference.device, dtype=reference.dtype)
