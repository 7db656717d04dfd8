"""Glue for inference engines, written once over any tier.

- `rotorquant.engine.slots`: writing new vectors into a compressed cache at flat slot indices
  (``quantize_into``).
- `rotorquant.engine.paging`: paged caches, a pool of blocks found through a block table.
"""
