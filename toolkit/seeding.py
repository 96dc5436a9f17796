"""Seeds: one seed type everywhere, and per-(problem, sample) seeds derived from a run seed."""

from __future__ import annotations

import hashlib

import numpy as np

from ttscale.errors import ConfigError

__all__ = [
    "SeedLike",
    "as_generator",
    "as_int_seed",
    "problem_seed",
    "sample_seed",
    "step_seed",
    "substream_seed",
]

SeedLike = None | int | np.random.Generator

_MAX_SEED = 2**31 - 1  # engines (vLLM, torch) accept 32-bit non-negative seeds


def as_generator(seed: SeedLike) -> np.random.Generator:
    """``None | int | Generator`` -> ``Generator`` (a Generator is returned as is, not copied)."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None:
        return np.random.default_rng()
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ConfigError(f"seed must be None, an int or a numpy Generator, got {seed!r}")
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")
    return np.random.default_rng(int(seed))


def as_int_seed(seed: SeedLike) -> int:
    """``None | int | Generator`` -> an int seed in ``[0, 2**31 - 1)``, for code that derives
    several seeds from one (``seed + j``) and reports the seed it used.

    An int is checked and returned as is; a Generator gives its next draw (so it advances);
    ``None`` gives a fresh seed from OS entropy.
    """
    if isinstance(seed, np.random.Generator) or seed is None:
        return int(as_generator(seed).integers(_MAX_SEED))
    as_generator(seed)  # validates: an int >= 0
    return int(seed)


def problem_seed(run_seed: int, problem_id: str) -> int:
    """A per-problem base seed: a keyed hash of ``(run_seed, problem_id)`` in ``[0, 2**31 - 1)``.

    Stable across processes and Python versions (not ``hash()``).
    """
    h = hashlib.blake2b(f"{int(run_seed)}\x1f{problem_id}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") % _MAX_SEED


def sample_seed(run_seed: int, problem_id: str, index: int) -> int:
    """The seed of sample ``index`` of ``problem_id`` in a run seeded with ``run_seed``.

    ``(problem_seed(run_seed, problem_id) + index) mod (2**31 - 1)``. Because it depends only on
    its arguments, sample 5 of a problem is the same sample whether the run asked for n=8 or
    n=256, on one worker or on many. Consecutive indices get consecutive seeds, so an engine whose
    ``n``-fan-out gives child ``j`` the seed ``seed + j`` can draw indices ``i..i+n-1`` in one
    request seeded with ``sample_seed(run_seed, problem_id, i)``.
    """
    if index < 0:
        raise ConfigError(f"sample index must be >= 0, got {index}")
    return (problem_seed(run_seed, problem_id) + int(index)) % _MAX_SEED


def step_seed(run_seed: int, problem_id: str, index: int, step: int) -> int:
    """The seed of step ``step`` of sample ``index`` of ``problem_id`` (step-wise samplers).

    Step 0 is :func:`sample_seed` (so a one-step run draws exactly the samples of a repeated
    sampling run). Step ``t > 0`` uses a per-(run, problem, step) base from a keyed hash, plus
    ``index``: ``(base(run_seed, problem_id, t) + index) mod (2**31 - 1)``. Steps are thus
    uncorrelated (each has its own hashed base), and consecutive indices of one step still get
    consecutive seeds (one ``n``-fan-out request per step on vLLM).
    """
    if index < 0:
        raise ConfigError(f"sample index must be >= 0, got {index}")
    if step < 0:
        raise ConfigError(f"step must be >= 0, got {step}")
    if step == 0:
        return sample_seed(run_seed, problem_id, index)
    h = hashlib.blake2b(
        f"{int(run_seed)}\x1f{problem_id}\x1fstep{int(step)}".encode(), digest_size=8
    )
    return (int.from_bytes(h.digest(), "little") + int(index)) % _MAX_SEED


def substream_seed(seed: int, k: int) -> int:
    """Seed ``k`` of a stream of seeds derived from one sample seed; ``substream_seed(s, 0) == s``.

    Used where one sample needs several engine calls that each draw fresh randomness (chunk
    ``k`` of chunked generation, :func:`ttscale.engines.base.generate_chunked`). ``k > 0`` is a
    keyed hash of ``(seed, k)`` in ``[0, 2**31 - 1)``.
    """
    if k < 0:
        raise ConfigError(f"substream index must be >= 0, got {k}")
    if k == 0:
        return int(seed)
    h = hashlib.blake2b(f"{int(seed)}\x1fchunk{int(k)}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") % _MAX_SEED
