"""Infrastructure shared by every train/ entry point: config files + overrides, atomic resumable checkpoints."""
