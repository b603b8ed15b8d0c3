"""Training recipes, one file per method; importing this package registers them all."""
from tunesmith.recipes import distill, pretrain, sft  # noqa: F401
