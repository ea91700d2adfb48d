"""apr_format: read and write the APR v2 (.apr) model container, byte-compatible with aprender."""

from . import errors
from .architecture import ArchitectureConfig, read_architecture
from .constants import DTYPE_BY_NAME, DTYPES, Flag
from .errors import AprError
from .families import FAMILIES, SUPPORTED_FAMILIES
from .header import Header
from .init_tensors import load_init_tensors
from .reader import AprFile, TensorInfo, open_apr
from .writer import AprWriter, save_apr

__all__ = [
    "AprError", "AprFile", "AprWriter", "ArchitectureConfig", "DTYPES", "DTYPE_BY_NAME", "FAMILIES", "Flag", "Header",
    "SUPPORTED_FAMILIES", "TensorInfo", "errors", "load_init_tensors", "open_apr", "read_architecture", "save_apr",
]
__version__ = "0.1.0"
