"""Hydra plugins of trainyard: thin adapters over trainyard's backends."""
