"""Talkative: a server for natural language autoencoders (NLAs)."""

__version__ = "0.1.0"
