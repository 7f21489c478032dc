"""ml_collections config modules of the experiment binaries, one per binary.

Each module's ``get_config(arg)`` returns a ``ConfigDict``; ``arg`` (the text
after ``:`` in ``--config=experiments/configs/<name>.py:<arg>``) picks a
variant, and every field can be overridden with ``--config.<field>=value``.
Every module has a ``tiny`` variant that tests/test_experiments.py runs.
"""
