"""Training recipes, one file per method, each registering itself under its method name (registry.methods
names these modules and imports them on its first lookup)."""
