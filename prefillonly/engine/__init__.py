from .runner import ModelRunner
from .sequence import Head, Pooling, Sequence

__all__ = ["ModelRunner", "Head", "Pooling", "Sequence"]
