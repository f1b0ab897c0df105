"""TensorRT engine building (GPU host, offline): `builder`, the FP32 layer pins (`precision`),
the strongly typed ONNX rewrite (`autocast`) and a tiny test model (`testing`).

The serving side of TensorRT (errors, profiles, bindings, meta, lib) lives in `engines.trt`.
"""
