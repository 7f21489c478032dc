"""Data sets for DENNL experiments."""
from dennl_jax.data.synthetic import (Population, SyntheticConfig, UserParams, World, embed,
                                      inject_noise, make_population, make_world,
                                      sample_sequences, sample_user, serialize, to_model)
from dennl_jax.data import events, marketplace, movielens
