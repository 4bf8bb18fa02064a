"""Avalanche plugins: thin adapters over losses, snapshot stores and teachers."""

from .m2kd import M2KDPlugin

__all__ = ["M2KDPlugin"]
