"""Configuration: the YAML loader and validator, its schema, the Heki ABI profiles."""
