"""Models: resolving the config's `model:` value (built-in names, local directories, GGUF files), the
built-in model cache, and loading models and tokenizers with no network and no remote code."""

from tunesmith.models.loading import load_model, load_tokenizer, resolve_model

__all__ = ["load_model", "load_tokenizer", "resolve_model"]
