"""fedtide: federated continual learning on Flower. The CLI and the runtimes live here."""

__version__ = "0.1.0"
