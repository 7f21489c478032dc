"""ml_collections config modules of the benchmark binaries, one per binary.

Each module's ``get_config(arg)`` returns a ``ConfigDict``; ``arg`` (the text
after ``:`` in ``--config=benchmarks/configs/<name>.py:<arg>``) picks a
variant (``experiments.configs.select_variant``), and every field can be
overridden with ``--config.<field>=value``.  Every module has a ``tiny`` variant.
"""
