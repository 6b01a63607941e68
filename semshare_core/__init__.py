"""SemShareKV: semantic KV-cache reuse for HuggingFace decoder LLMs (no Ray here).

Public API: :class:`SemShareConfig`, :class:`SemShareEngine`, :class:`SemanticIndex`,
:class:`PackedKV`, :class:`ModelSignature`, :func:`map_tokens`, :func:`prompt_vector`.
"""
from .config import SemShareConfig
from .engine import PrefillResult, PrefillStats, SemShareEngine
from .fingerprint import prompt_vector, similarity
from .kv import KVFormatError, KVMismatchError, ModelSignature, PackedKV
from .matching import TokenMapping, map_tokens

_LAZY = {"SemanticIndex", "IndexEntry", "Match", "SourceCover"}  # faiss is imported only when the index is used


def __getattr__(name: str):
    if name in _LAZY:
        from . import index

        return getattr(index, name)
    raise AttributeError(f"module 'semshare_core' has no attribute {name!r}")


__all__ = ["SemShareConfig", "SemShareEngine", "PrefillResult", "PrefillStats", "prompt_vector", "similarity",
           "SemanticIndex", "IndexEntry", "Match", "PackedKV", "ModelSignature", "KVMismatchError",
           "KVFormatError", "TokenMapping", "map_tokens"]
