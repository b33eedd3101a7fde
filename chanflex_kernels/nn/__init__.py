"""Modules built on the chanflex ops."""
from .channel_flex import ChannelFlexConv2d, FlexChannelConv2d
from .dynamic_conv import DynamicConv2d, anneal_temperature, convert

__all__ = ["ChannelFlexConv2d", "DynamicConv2d", "FlexChannelConv2d", "anneal_temperature", "convert"]
