"""cellstream: streaming inference for recurrent cells, one hidden state per stream."""

__version__ = "0.1.0"
