"""Training configs: one get_config() per protocol; every field is documented in default.py."""
