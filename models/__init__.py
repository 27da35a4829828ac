"""Backbones and projection / prediction heads."""
