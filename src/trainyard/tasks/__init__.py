"""LightningModules: how a network is trained (loss, metrics, optimizer wiring)."""

from trainyard.tasks.classifier import Classifier

__all__ = ["Classifier"]
