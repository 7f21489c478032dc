"""The library version (read by the parameter files as well as by ``dennl_jax.__version__``)."""
__version__ = "0.1.0"
