"""Seed derivation and the per-candidate CPU generator whose state travels with a row (see README, "The seed contract").

Derivation (stable; users script against it):
- a row's base seed is its `seed` column value when present (0 <= seed < 2^63); otherwise
  blake2b-64("{run seed}:{row id}") masked to 63 bits;
- candidate j of a row gets seed (base + j) mod 2^63, so candidate 0 of a row with seed s is exactly
  `UnCLIPPipeline(..., generator=[torch.Generator("cpu").manual_seed(s)])`;
- with `prior.best_of` m > 1, prior sample 0 of a candidate uses the candidate's own generator and
  samples i = 1..m-1 use blake2b-64("{candidate seed}:best_of:{i}"); the decoder and upsamplers always
  continue the candidate's own generator.

Every generator is a CPU generator, whatever device a stage computes on: draws are made on the CPU and moved
to the compute device (as diffusers' randn_tensor does for a CPU generator). CUDA's random fill depends on the
card's SM count, so draws from a CUDA generator would differ between GPU models.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# torch is imported where generators are made, not here: the input readers derive seeds in Ray tasks that
# would otherwise each pay the second it takes to import torch.
SEED_LIMIT = 2**63
GENERATOR_STATE_BYTES = 5056
"""Size of the state that travels between stages: the CPU generator's mt19937 table (checked when one is made)."""


def _hash63(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") % SEED_LIMIT


def derived_base_seed(run_seed: int, row_id: str) -> int:
    """Base seed of a row without a seed column."""
    return _hash63(f"{run_seed}:{row_id}")


def candidate_seeds(base_seed: int, candidates: int) -> np.ndarray:
    return np.array([(base_seed + j) % SEED_LIMIT for j in range(candidates)], dtype=np.int64)


def best_of_seed(candidate_seed: int, sample: int) -> int:
    return candidate_seed if sample == 0 else _hash63(f"{candidate_seed}:best_of:{sample}")


def new_generator(seed: int) -> torch.Generator:
    """The CPU generator of a seed."""
    import torch

    return torch.Generator("cpu").manual_seed(int(seed))


def generator_state(generator: torch.Generator) -> np.ndarray:
    """The generator's full state as bytes (the CPU generator's mt19937 table: GENERATOR_STATE_BYTES)."""
    state = generator.get_state().numpy().copy()
    if state.size != GENERATOR_STATE_BYTES:
        raise RuntimeError(f"this torch's CPU generator state has {state.size} bytes, not {GENERATOR_STATE_BYTES}: "
                           "update pipeline.seeds.GENERATOR_STATE_BYTES")
    return state


def restore_generator(state: np.ndarray) -> torch.Generator:
    """The CPU generator continuing from `state` (bytes from generator_state)."""
    import torch

    generator = torch.Generator("cpu")
    generator.set_state(torch.from_numpy(np.ascontiguousarray(state, dtype=np.uint8)))
    return generator

