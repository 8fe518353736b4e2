"""MOSAIC-Ray: train LLM agents that know when to act and when to refuse in multi-step tool use."""

__version__ = "0.1.0"
