"""Shapes: synthetic scenes with exact masks, and the tiny SD-family model trained on them."""
