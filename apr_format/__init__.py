"""apr_format: read and write the APR v2 (.apr) model container, byte-compatible with aprender."""

from . import errors
from .constants import DTYPE_BY_NAME, DTYPES, Flag
from .errors import AprError
from .header import Header
from .reader import AprFile, TensorInfo, open_apr
from .writer import AprWriter, save_apr

__all__ = [
    "AprError", "AprFile", "AprWriter", "DTYPES", "DTYPE_BY_NAME", "Flag", "Header", "TensorInfo",
    "errors", "open_apr", "save_apr",
]
__version__ = "0.1.0"
