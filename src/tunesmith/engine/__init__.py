"""Running a model, for evaluation, training and serving alike: generation with a KV cache and log-likelihood
(generation.py), the forward pass to hidden states and the head at the targets (forward.py), reward models
(reward_model.py)."""
