"""Kept for `from cellstream.coalesce import Stepper`: the stepper lives in cellstream.client."""

from cellstream.client.coalesce import Contract, StepError, Stepper, StepperStats

__all__ = ["Contract", "StepError", "Stepper", "StepperStats"]
