"""Independent re-expression of the official Kosmos-G conditioning path, used by the parity tests.

See official_reference.py. Nothing here imports kosmosg_core."""
