"""The minibatch of users that losses, train steps and sharding take."""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax


class Batch(NamedTuple):
  """A minibatch of users (every field has a leading user axis B).

  embedding: (B, E); obs: (B, T, ...); mask: (B, T) bool;
  target: (B, P) regression target (EM Mapping) or None.
  """
  embedding: jax.Array
  obs: jax.Array
  mask: jax.Array
  target: Optional[jax.Array] = None
