"""Framework-agnostic core of fedtide: config, data, scenarios, models, metrics, files.

Nothing in this package imports Flower, so every runtime shares it unchanged.
"""
