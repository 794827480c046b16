"""trainyard: one Lightning entrypoint, Hydra configs, DDP from one box to a cluster."""

__version__ = "0.1.0"
