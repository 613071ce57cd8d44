"""Durable adapter storage: PEFT LoRA parsing and validation, atomic versioned writes, sha256, listing.

Independent of the server: it imports torch and safetensors only, never pickle.
"""

from .errors import (
    AdapterError,
    AdapterIntegrityError,
    AdapterNotFoundError,
    AdapterStorageFullError,
    AdapterTooLargeError,
    AdapterValidationError,
    InvalidAdapterNameError,
)
from .peft_format import load_adapter_dir, parse_adapter
from .records import NAME_RE, AdapterRecord, validate_name
from .spec import AdapterWeights, BaseModelSpec, weights_nbytes
from .store import AdapterStore

__all__ = [
    "NAME_RE",
    "AdapterError",
    "AdapterIntegrityError",
    "AdapterNotFoundError",
    "AdapterRecord",
    "AdapterStorageFullError",
    "AdapterStore",
    "AdapterTooLargeError",
    "AdapterValidationError",
    "AdapterWeights",
    "BaseModelSpec",
    "InvalidAdapterNameError",
    "load_adapter_dir",
    "parse_adapter",
    "validate_name",
    "weights_nbytes",
]
