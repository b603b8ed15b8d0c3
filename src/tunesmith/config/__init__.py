"""The typed config: its schema and defaults (schema.py), and reading it from YAML and overrides with FILE:LINE
errors, and writing the resolved config (loading.py)."""
