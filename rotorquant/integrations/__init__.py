"""Integrations with inference libraries. Each submodule imports its library lazily:

- `rotorquant.integrations.transformers`: `RotorQuantCache`, a transformers 5.x KV cache that keeps
  keys and values as packed RotorQuant codes (needs ``pip install 'rotorquant[hf,torch]'``).

Importing this package needs neither transformers nor torch.
"""
