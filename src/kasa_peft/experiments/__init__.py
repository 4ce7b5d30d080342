"""Experiment harness: data, training, evaluation and reporting for the KaSA paper reproductions.

The harness is offline by default: importing it sets ``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE`` and
``HF_DATASETS_OFFLINE`` (unless already set), before any Hugging Face library is imported here, because
``huggingface_hub`` and ``datasets`` read these variables once, at import. Without this, a mistyped model name is
retried against the Hub for half a minute on a machine without internet. Set ``HF_HUB_OFFLINE=0`` to allow downloads.
"""

import os as _os

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def _set_offline_defaults() -> None:
    # One switch for all three: an explicit HF_HUB_OFFLINE=0 turns the others off too unless they are set.
    hub = _os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for name in OFFLINE_VARIABLES[1:]:
        _os.environ.setdefault(name, hub)
    _os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


_set_offline_defaults()


def _quiet_bitsandbytes_kernel_notice() -> None:
    # transformers imports bitsandbytes whenever it is installed (kasa-peft[quant]); on CPUs with AVX512-BF16 its CPU
    # backend then warns on every command that it could not fetch an optional kernel from the Hub. Offline that
    # fetch can never succeed and bitsandbytes falls back to its own kernel, so the notice is only noise here.
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


_quiet_bitsandbytes_kernel_notice()
