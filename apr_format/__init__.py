"""apr_format: read and write the APR v2 (.apr) model container, byte-compatible with aprender.

Reading (lazy: header, metadata and index are parsed, tensor bytes stay on disk)::

    from apr_format import open_apr
    with open_apr("model.apr") as f:        # an AprFile: a read-only mapping name -> numpy array
        f.metadata["architecture"]          # the JSON metadata as a dict
        w = f["model.norm.weight"]          # values in their dtype (bf16 as ml_dtypes.bfloat16)
        f.bits("model.norm.weight")         # the stored bits (bf16 as uint16)
        f.to_float32("lm_head.weight")      # float32 copy, q4 / q8 dequantized
        "lm_head.weight" in f, f.get("x"), list(f.items())
        f.verify()                          # footer CRC-32 over the whole file

Writing (atomic: a temp file beside the destination, renamed when complete)::

    from apr_format import save_apr, AprWriter
    save_apr("out.apr", {"w": array}, {"architecture": "llama"})

Other entry points: `load_init_tensors` (torch tensors keyed by parameter name, shapes, CRC and
NaN/Inf checked), `read_architecture`, `StreamingVerifier` (the footer CRC while you stream),
`apr_format.validate.validate_file` (every check, as `apr validate`).

Errors: every failure is an `AprError` subclass whose message is "{path}: {problem}"
(`apr_format.errors`): BadMagic, Truncated, CorruptIndex, FooterChecksum, MissingTensor (also a
KeyError), FileMissing / NotAFile / Unreadable (also OSErrors), ...
"""

from . import errors
from .architecture import ArchitectureConfig, read_architecture
from .constants import DTYPE_BY_NAME, DTYPES, Flag
from .errors import AprError, FileMissing, MissingTensor, NotAFile, Unreadable
from .families import FAMILIES, SUPPORTED_FAMILIES
from .header import Header
from .init_tensors import load_init_tensors
from .integrity import StreamingVerifier
from .reader import AprFile, TensorInfo, open_apr
from .writer import AprWriter, save_apr

__all__ = [
    "AprError", "AprFile", "AprWriter", "ArchitectureConfig", "DTYPES", "DTYPE_BY_NAME", "FAMILIES", "FileMissing",
    "Flag", "Header", "MissingTensor", "NotAFile", "SUPPORTED_FAMILIES", "StreamingVerifier", "TensorInfo",
    "Unreadable", "errors", "load_init_tensors", "open_apr", "read_architecture", "save_apr",
]
__version__ = "0.1.0"
