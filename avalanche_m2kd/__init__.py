"""avalanche-m2kd: M2KD and Education Distillation for class-incremental
learning, as Avalanche plugins and strategies."""

from . import checkpoint, datasets, device_data, distributed, exemplars, losses, metrics, models, precision
from .device_data import DeviceDataPlugin, random_crop_flip
from .losses import M2KDLoss
from .models import EDStudent
from .plugins import EducationDistillationPlugin, M2KDPlugin, NMEClassifierPlugin, PairedStreamPlugin, RoutedDistillationPlugin
from .precision import MixedPrecisionPlugin
from .regularizer import M2KDRegularizer
from .snapshots import (
    FullSnapshotStore,
    PackNetSnapshotStore,
    SnapshotStore,
    SparseSnapshotStore,
    make_snapshot_store,
)
from .strategies import M2KD, EducationDistillation
from .teachers import GroupTeacher, TeacherOutput, TeacherSet

__version__ = "0.2.0"

__all__ = [
    "DeviceDataPlugin",
    "EDStudent",
    "EducationDistillation",
    "EducationDistillationPlugin",
    "FullSnapshotStore",
    "GroupTeacher",
    "M2KD",
    "M2KDLoss",
    "M2KDPlugin",
    "M2KDRegularizer",
    "MixedPrecisionPlugin",
    "NMEClassifierPlugin",
    "PackNetSnapshotStore",
    "PairedStreamPlugin",
    "RoutedDistillationPlugin",
    "SnapshotStore",
    "SparseSnapshotStore",
    "TeacherOutput",
    "TeacherSet",
    "checkpoint",
    "datasets",
    "device_data",
    "distributed",
    "exemplars",
    "losses",
    "make_snapshot_store",
    "metrics",
    "models",
    "precision",
    "random_crop_flip",
]
