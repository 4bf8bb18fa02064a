"""Avalanche plugins: thin adapters over losses, snapshot stores and teachers."""

from .ed import EducationDistillationPlugin
from .m2kd import M2KDPlugin

__all__ = ["EducationDistillationPlugin", "M2KDPlugin"]
