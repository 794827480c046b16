"""trainyard: one Lightning entrypoint, Hydra configs, DDP from one box to a cluster."""

__version__ = "0.1.0"


def load(path, device="cpu"):
    """The network trained in a run directory (or saved in a checkpoint file), in eval mode
    on ``device``, with the input preprocessing it was trained with: a
    :class:`trainyard.inference.Predictor` (``.net``, ``.transform``, ``.predict(x)``)."""
    from trainyard.inference import load as _load  # torch is imported only when used

    return _load(path, device)
