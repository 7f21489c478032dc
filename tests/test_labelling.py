"""Labelling accuracy vs. brute force over all relabellings."""
import itertools

import numpy as np
import pytest

from dennl_jax import labelling


def _brute_force(true_states, decoded, num_states):
  best = 0
  for perm in itertools.permutations(range(num_states)):
    best = max(best, int(np.sum(np.asarray(perm)[decoded] == true_states)))
  return best


def test_permuted_labels_score_one():
  rng = np.random.default_rng(0)
  true = rng.integers(0, 4, size=(3, 30))
  perm = np.array([2, 0, 3, 1])
  assert labelling.labelling_accuracy(true, perm[true], 4) == 1.0


def test_hand_computed_partial_case():
  true = np.array([[0, 0, 0, 1, 1, 2]])
  decoded = np.array([[1, 1, 2, 0, 0, 0]])
  # Best map: 1->0 (2 hits), 0->1 (2 hits), 2->2 (0 hits): 4 of 6.
  assert labelling.labelling_accuracy(true, decoded, 3) == pytest.approx(4 / 6)


def test_each_user_gets_its_own_relabelling_and_steps_are_pooled():
  true = np.array([[0, 0, 1, 1], [0, 1, 1, 1]])
  decoded = np.array([[1, 1, 0, 0], [0, 0, 0, 1]])
  # User 0: 4/4 under swap.  User 1: identity gives 2 (t0, t3); swap gives 2. -> 2/4.
  assert labelling.labelling_accuracy(true, decoded, 2) == pytest.approx(6 / 8)
  np.testing.assert_allclose(labelling.per_user_accuracy(true, decoded, 2), [1.0, 0.5])


def test_matches_brute_force_on_random_cases():
  rng = np.random.default_rng(1)
  for _ in range(20):
    k = int(rng.integers(2, 6))
    true = rng.integers(0, k, size=25)
    decoded = rng.integers(0, k, size=25)
    hits, total = labelling.matched_steps(true, decoded, k)
    assert total == 25
    assert hits == _brute_force(true, decoded, k)


def test_mask_excludes_steps():
  true = np.array([[0, 1, 0, 1]])
  decoded = np.array([[0, 1, 1, 0]])
  mask = np.array([[True, True, False, False]])
  assert labelling.labelling_accuracy(true, decoded, 2, mask) == 1.0
  assert labelling.labelling_accuracy(true, decoded, 2) == 0.5


def test_bad_input_raises():
  with pytest.raises(ValueError, match="outside"):
    labelling.labelling_accuracy(np.array([[0, 3]]), np.array([[0, 1]]), 2)
  with pytest.raises(ValueError, match="U, T"):
    labelling.labelling_accuracy(np.array([0, 1]), np.array([0, 1]), 2)
  with pytest.raises(ValueError, match="no valid"):
    labelling.labelling_accuracy(np.array([[0]]), np.array([[0]]), 2, np.array([[False]]))
