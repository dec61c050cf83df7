"""Training configs: one get_config() per protocol, overriding gcp_jax.config.get_config() (every field documented there)."""
