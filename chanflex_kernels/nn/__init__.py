"""Modules built on the chanflex ops."""
from .dynamic_conv import DynamicConv2d, anneal_temperature, convert

__all__ = ["DynamicConv2d", "anneal_temperature", "convert"]
