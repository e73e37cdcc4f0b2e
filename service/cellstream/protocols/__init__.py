"""Protocols: the only server-side code that knows gRPC and protobuf. Each servicer translates
messages into engine calls and domain errors into status codes (status.py), nothing else."""
