"""Avalanche plugins: thin adapters over losses, snapshot stores and teachers."""

from .ed import EducationDistillationPlugin
from .kd import RoutedDistillationPlugin
from .m2kd import M2KDPlugin
from .nme import NMEClassifierPlugin
from .paired_stream import PairedStreamPlugin

__all__ = ["EducationDistillationPlugin", "M2KDPlugin", "NMEClassifierPlugin", "PairedStreamPlugin", "RoutedDistillationPlugin"]
