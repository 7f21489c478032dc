"""Bad input raises ValueError naming the problem; inputs are never modified;
``dj.checked`` and ``dj.validate`` cover the traced (jit/vmap) case."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dennl_jax as dj
from helpers import (FAMILIES, NUM_SYMBOLS, PUBLIC_SEQUENCE_FUNCTIONS, random_hmm, random_obs,
                     slow_except, stack_trees)

pytestmark = pytest.mark.x64

PUBLIC = PUBLIC_SEQUENCE_FUNCTIONS


def _case(family, seed=0):
  rng = np.random.default_rng([70, FAMILIES.index(family), seed])
  return random_hmm(family, rng, 3), random_obs(family, rng, 6), np.ones(6, bool)


def _set(array, index, value):
  out = np.array(array, copy=True)
  out[index] = value
  return out


def bad_inputs():
  """(id, family, build(hmm, obs, mask) -> (hmm, obs, mask), message regex)."""
  cases = [
      # shapes
      ("categorical_obs_2d", "categorical", lambda h, o, m: (h, o[:, None], m), "shape"),
      ("categorical_obs_float", "categorical", lambda h, o, m: (h, o.astype(float), m), "integers"),
      ("gaussian_obs_wrong_dim", "gaussian", lambda h, o, m: (h, o[:, :1], m), r"shape \(T, 2\)"),
      ("multinomial_obs_wrong_dim", "multinomial", lambda h, o, m: (h, o[:, :2], m), "shape"),
      ("poisson_obs_2d", "poisson", lambda h, o, m: (h, o[:, None], m), "shape"),
      ("mask_wrong_length", "categorical", lambda h, o, m: (h, o, m[:-1]), "mask has shape"),
      ("obs_scalar", "poisson", lambda h, o, m: (h, o[0], m), "time axis|shape"),
      ("transition_wrong_shape", "categorical",
       lambda h, o, m: (h.replace(transition=np.full((3, 4), 0.25)), o, m), "HMM.transition has shape"),
      ("emission_wrong_num_states", "categorical",
       lambda h, o, m: (h.replace(emission=dj.Categorical(np.full((2, NUM_SYMBOLS), 0.25))), o, m),
       "states"),
      # observation domain
      ("category_too_large", "categorical", lambda h, o, m: (h, _set(o, 2, NUM_SYMBOLS), m),
       "out of range"),
      ("category_negative", "categorical", lambda h, o, m: (h, _set(o, 0, -1), m), "out of range"),
      ("gaussian_nan", "gaussian", lambda h, o, m: (h, _set(o, (1, 0), np.nan), m), "NaN or inf"),
      ("diag_gaussian_inf", "diag_gaussian", lambda h, o, m: (h, _set(o, (3, 1), np.inf), m),
       "NaN or inf"),
      ("poisson_nan", "poisson", lambda h, o, m: (h, _set(o, 1, np.nan), m), "NaN or inf"),
      ("multinomial_nan", "multinomial", lambda h, o, m: (h, _set(o, (1, 0), np.nan), m),
       "NaN or inf"),
      ("poisson_negative", "poisson", lambda h, o, m: (h, _set(o, 4, -1.0), m), "negative"),
      ("poisson_fractional", "poisson", lambda h, o, m: (h, _set(o, 4, 1.5), m), "whole"),
      ("multinomial_negative", "multinomial", lambda h, o, m: (h, _set(o, (2, 1), -1.0), m),
       "negative"),
      # parameters
      ("initial_negative", "categorical",
       lambda h, o, m: (h.replace(initial=np.array([1.2, -0.1, -0.1])), o, m), "HMM.initial.*negative"),
      ("initial_not_normalised", "poisson",
       lambda h, o, m: (h.replace(initial=np.array([0.5, 0.2, 0.2])), o, m), "HMM.initial.*sum to 1"),
      ("transition_rows", "gaussian",
       lambda h, o, m: (h.replace(transition=np.full((3, 3), 0.3)), o, m), "HMM.transition.*sum to 1"),
      ("transition_nan", "gaussian",
       lambda h, o, m: (h.replace(transition=_set(h.transition, (0, 0), np.nan)), o, m),
       "HMM.transition.*NaN"),
      ("categorical_probs", "categorical",
       lambda h, o, m: (h.replace(emission=dj.Categorical(np.full((3, NUM_SYMBOLS), 0.3))), o, m),
       "Categorical.probs.*sum to 1"),
      ("multinomial_probs_negative", "multinomial",
       lambda h, o, m: (h.replace(emission=dj.Multinomial(np.array([[1.5, -0.5, 0.0]] * 3))), o, m),
       "Multinomial.probs.*negative"),
      ("poisson_rate_zero", "poisson",
       lambda h, o, m: (h.replace(emission=dj.Poisson(np.array([1.0, 0.0, 2.0]))), o, m),
       "Poisson.rate.*positive"),
      ("diag_var_negative", "diag_gaussian",
       lambda h, o, m: (h.replace(emission=h.emission.replace(var=-np.asarray(h.emission.var))), o, m),
       "DiagGaussian.var.*positive"),
      ("cov_not_pd", "gaussian",
       lambda h, o, m: (h.replace(emission=h.emission.replace(
           cov=np.stack([np.array([[1.0, 2.0], [2.0, 1.0]])] * 3))), o, m), "positive definite"),
      ("cov_not_symmetric", "gaussian",
       lambda h, o, m: (h.replace(emission=h.emission.replace(
           cov=np.stack([np.array([[1.0, 0.5], [0.0, 1.0]])] * 3))), o, m), "symmetric"),
      # mask
      ("mask_empty", "categorical", lambda h, o, m: (h, o, np.zeros_like(m)), "no valid step"),
      ("mask_int_dtype", "categorical", lambda h, o, m: (h, o, m.astype(np.int32)), "bool"),
  ]
  return cases


BAD = bad_inputs()


@pytest.mark.parametrize("case_id,family,build,message", BAD, ids=[c[0] for c in BAD])
def test_bad_input_raises_value_error(case_id, family, build, message):
  hmm, obs, mask = build(*_case(family))
  for name, fn in PUBLIC.items():
    with pytest.raises(ValueError, match=message):
      fn(hmm, obs, mask)
  with pytest.raises(ValueError, match=message):
    dj.validate(hmm, obs, mask)


def test_good_input_passes_and_padding_garbage_is_allowed():
  hmm, obs, mask = _case("categorical")
  obs = _set(obs, 2, 99)
  mask = _set(mask, 2, False)
  dj.validate(hmm, obs, mask)
  assert np.isfinite(float(dj.log_likelihood(hmm, obs, mask)))


def test_sample_and_stationary_validate_parameters():
  hmm, _, _ = _case("categorical")
  with pytest.raises(ValueError, match="HMM.transition"):
    dj.sample(jax.random.PRNGKey(0), hmm.replace(transition=np.full((3, 3), 0.5)), 4)
  with pytest.raises(ValueError, match="transition"):
    dj.stationary_distribution(np.full((3, 3), 0.5))


@pytest.mark.parametrize("family", slow_except(FAMILIES, "gaussian"))
def test_inputs_are_not_modified(family):
  hmm, obs, mask = _case(family, seed=1)
  mask = _set(mask, 0, False)
  obs = np.array(obs)
  copies = jax.tree_util.tree_map(np.copy, (hmm, obs, mask))
  # All functions for one family; the family-specific code paths (obs checks,
  # likelihoods, statistics, M-step) are all reached through em_step.
  names = PUBLIC if family == "categorical" else ["log_likelihood", "em_step"]
  for name in names:
    PUBLIC[name](hmm, obs, mask)
  dj.sample(jax.random.PRNGKey(0), hmm, 3)
  dj.stationary_distribution(hmm.transition)
  dj.validate(hmm, obs, mask)
  for before, after in zip(jax.tree_util.tree_leaves(copies),
                           jax.tree_util.tree_leaves((hmm, obs, mask))):
    assert isinstance(after, np.ndarray)
    np.testing.assert_array_equal(before, after)


def test_checked_catches_nan_under_jit():
  hmm, obs, mask = _case("gaussian")
  fn = jax.jit(dj.checked(dj.log_likelihood))
  err, out = fn(hmm, obs, mask)
  assert err.get() is None and np.isfinite(float(out))
  # NaN on a padded step is ignored ...
  err, _ = fn(hmm, _set(obs, (0, 0), np.nan), _set(mask, 0, False))
  assert err.get() is None
  # ... but NaN on a valid step is reported.
  err, _ = fn(hmm, _set(obs, (2, 1), np.nan), mask)
  assert err.get() is not None and "nan" in err.get().lower()
  with pytest.raises(Exception, match="(?i)nan"):
    err.throw()


def test_validate_with_user_axis():
  rng = np.random.default_rng(71)
  models = [random_hmm("categorical", rng, 3) for _ in range(3)]
  batch = stack_trees(models)
  obs = np.stack([random_obs("categorical", rng, 5) for _ in range(3)])
  masks = np.ones((3, 5), bool)
  dj.validate(batch, obs, masks)
  with pytest.raises(ValueError, match="user 1: .*out of range"):
    dj.validate(batch, _set(obs, (1, 3), NUM_SYMBOLS), masks)
  with pytest.raises(ValueError, match="user 2: .*no valid step"):
    dj.validate(batch, obs, _set(masks, 2, False))
  with pytest.raises(ValueError, match="leading user axis"):
    dj.validate(batch, obs[:2], masks)


def test_decode_states_validates_concrete_inputs():
  rng = np.random.default_rng(5)
  hmms = jax.tree_util.tree_map(lambda *x: np.stack(x),
                                *[random_hmm("categorical", rng, 3) for _ in range(3)])
  obs = rng.integers(0, NUM_SYMBOLS, (3, 6))
  mask = np.ones((3, 6), bool)
  assert dj.decode_states(hmms, obs, mask).shape == (3, 6)
  with pytest.raises(ValueError, match="leading user axis of size 2"):
    dj.decode_states(hmms, obs[:2], mask[:2])          # one user's parameters too many
  bad = obs.copy()
  bad[1, 2] = NUM_SYMBOLS + 3
  with pytest.raises(ValueError, match="user 1: Categorical obs out of range"):
    dj.decode_states(hmms, bad, mask)
  with pytest.raises(ValueError, match=r"mask must have shape \(U, T\)"):
    dj.decode_states(jax.tree_util.tree_map(lambda x: x[0], hmms), obs[0], mask[0])
  with pytest.raises(ValueError, match="chunk_size"):
    dj.decode_states(hmms, obs, mask, chunk_size=0)
