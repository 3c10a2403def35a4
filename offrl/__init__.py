"""offrl: a Ray-scaled experiment platform for offline and offline-to-online RL on robot manipulation."""

__version__ = "0.1.0"
