"""Nano models: the procedural subject world, its judge, and the small SD1.5-format score model."""
