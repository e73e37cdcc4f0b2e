"""Streams: per-stream state in numpy slabs (store), which version holds each stream (directory),
and snapshot files. Nothing here knows gRPC or onnxruntime."""
