"""A Lightning Trainer with every extra off, for tests of single components.

A helper that tests import, not a test module: it asserts nothing itself.
"""

from __future__ import annotations

import pytorch_lightning as pl


def quiet_trainer(**overrides) -> pl.Trainer:
    settings = {
        "accelerator": "cpu",
        "limit_val_batches": 0,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    settings.update(overrides)
    return pl.Trainer(**settings)
