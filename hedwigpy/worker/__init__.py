"""Delivery: scheduling, MX resolution, connection pools and bounces."""
