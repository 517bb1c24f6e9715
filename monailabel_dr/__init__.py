"""monailabel-dr: a MONAI Label app for diabetic retinopathy in colour fundus photographs."""

__version__ = "0.1.0"
