"""Benchmarks of cellstream against its ceilings (in-process onnxruntime, a no-op gRPC echo) and
baselines (a naive server, cellstream without batching); `python -m bench --help`."""
