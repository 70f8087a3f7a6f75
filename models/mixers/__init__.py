"""Sequence mixers. Importing this package registers every mixer kind in `MIXERS`."""
from models.mixers import attention  # noqa: F401
