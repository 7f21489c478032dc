"""ml_collections config modules of the benchmark binaries, one per binary.

Each module's ``get_config(arg)`` returns a ``ConfigDict``; ``arg`` (the text
after ``:`` in ``--config=benchmarks/configs/<name>.py:<arg>``) picks a
variant, and every field can be overridden with ``--config.<field>=value``.
Every module has a ``tiny`` variant that tests/test_experiments.py runs.
"""


def select_variant(variants, arg, default="full"):
  """The variant ``arg`` names (``default`` when empty); ValueError lists the choices."""
  variant = arg or default
  if variant not in variants:
    raise ValueError(f"unknown variant {variant!r}; choose from {sorted(variants)}")
  return variant
