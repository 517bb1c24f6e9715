"""Fundus photograph I/O, geometry, lesion vocabulary and synthetic phantoms.

Nothing in this package knows about MONAI Label: it can be used and tested alone.
"""
