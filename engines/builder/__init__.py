"""Build-side engine tooling: needs the `build` extra (torch, transformers, scikit-learn).

Training (`train`), ONNX export and INT8 quantization (`export`), the torch fp32 reference
(`model`, `torch_backend`), the parity gate (`parity`), the build pipeline that registers
engines (`pipeline`), the engine bench (`bench`), data sets (`data`) and evaluation
(`metrics`). Serving code (`engines.load` and the backends) never imports this package,
except the loader's lazy import of the torch reference backend.
"""
