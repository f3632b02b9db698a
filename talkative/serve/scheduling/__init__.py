"""Deciding and executing: a pure policy over snapshots, the scheduler loop that applies it, and the workers."""
