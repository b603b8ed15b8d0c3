"""Generating data with models: RLAIF labels (`tunesmith label`: a policy samples replies, a judge labels them) and
reward-model ratings of a file (`tunesmith score`). What they write is training data; evaluation stays in eval/."""
