"""Sequence mixers. Importing this package registers every mixer kind in `MIXERS`."""
from models.mixers import attention  # noqa: F401
from models.mixers import deltanet  # noqa: F401
from models.mixers import ttt  # noqa: F401
