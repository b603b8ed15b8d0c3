"""Training recipes, one file per method; importing this package registers them all."""
from tunesmith.recipes import distill, dpo, grpo, ppo, pretrain, reward, sft  # noqa: F401
