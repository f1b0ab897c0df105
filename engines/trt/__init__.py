"""TensorRT FP16 engines: build (offline, GPU host) and the pure decisions around them.

Only `builder`, `lib` (in its functions) and `engines.backends.tensorrt.TensorRTBackend.load`
touch `tensorrt`, and only inside calls, so every module here imports on a CPU-only host:

- `errors`    typed errors (`TensorRTUnavailable`, `TensorRTBuildError`, `ShapeError`, ...)
- `profiles`  optimization profiles, profile choice, request shape checks, dtype table,
              output shapes
- `bindings`  the engine's I/O contract check and per-request dtype conversion
- `precision` which layers stay FP32 in an FP16 engine
- `autocast`  ONNX rewrite for strongly typed builds (MatMul/Gemm in FP16, the rest FP32)
- `meta`      the plan's JSON sidecar and the TensorRT-version / GPU compatibility check
- `lib`       lazy `import tensorrt`, CUDA device lookup, the shared TensorRT logger
- `builder`   `build_engine(onnx_path, out_path, ...)`: export side, never imported by serving
- `testing`   a tiny BERT-like model with the serving contract, for tests (imports torch)

This `__init__` imports nothing, so the serving path never pulls in export code.
"""
