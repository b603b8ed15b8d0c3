"""tunesmith's processes stay off the network: it never downloads from the Hugging Face Hub (models come from the
registry's packages or from local directories, read with local_files_only), and the libraries beneath it must not
either. bitsandbytes 0.49, when imported on a CPU with AVX512-BF16 (peft imports it whenever it is installed), asks
the `kernels` package (a transformers dependency) for a kernel from the Hub: remote code, fetched at import. With
HF_HUB_OFFLINE=1 that is a local cache miss, and bitsandbytes keeps its own kernels. A user's own setting wins.
"""

from __future__ import annotations

import logging
import os

# bitsandbytes' warning that the Hub kernel could not be loaded: expected, and nothing for a user to fix
QUIET_LOGGERS = ("bitsandbytes.backends.cpu.ops",)


def stay_offline() -> None:
    """Run before anything imports huggingface_hub (it reads HF_HUB_OFFLINE when imported)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
