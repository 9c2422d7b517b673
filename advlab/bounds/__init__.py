"""Bounds on the minimum adversarial distortion: certified lower bounds and exact minima."""
