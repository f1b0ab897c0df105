"""Model loading, tokenization, ONNX export, runtime backends, precision and versioned artifacts.

Serving code imports only `engines.types` and `engines.load` (no export/training code).
"""

from engines.types import EMBEDDING_DIM, BatchResult, Engine, ModelIdentity

__all__ = ["EMBEDDING_DIM", "BatchResult", "Engine", "ModelIdentity"]
