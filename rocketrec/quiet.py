"""Quiet third-party chatter. Its own module, free of heavy imports: a Ray worker calls
it before importing torchrec (whose fbgemm import logs a line per library at INFO)."""

from __future__ import annotations


def quiet_library_noise() -> None:
    """Hide third-party deprecation chatter so progress and errors stay readable."""
    import logging
    import warnings

    for mod in ("torch", "torchrec", "fbgemm_gpu", "ray"):
        warnings.filterwarnings("ignore", module=mod)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    for name in ("fbgemm_gpu", "torchrec"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)
