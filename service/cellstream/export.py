"""Kept for `cellstream.export.export_torch`: the exporter lives in cellstream.tools.export."""

from cellstream.tools.export import ExportCheckError, ExportReport, export_torch

__all__ = ["ExportCheckError", "ExportReport", "export_torch"]
