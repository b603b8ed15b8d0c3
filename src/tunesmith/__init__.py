"""tunesmith: fine-tune pre-trained language models on your own data, on your own hardware."""

__version__ = "0.1.0"
