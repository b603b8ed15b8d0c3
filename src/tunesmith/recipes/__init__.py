"""Training recipes, one file per method; importing this package registers them all."""
from tunesmith.recipes import pretrain, sft  # noqa: F401
