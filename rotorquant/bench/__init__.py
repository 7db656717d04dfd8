"""Evaluation: the ``rotorquant`` command and what it measures (not needed to compress anything).

- `rotorquant.bench.cli`: ``rotorquant bench``, the main job.
- `rotorquant.bench.fidelity`: attention and embedding fidelity on real keys and values.
- `rotorquant.bench.minilm`: all-MiniLM-L6-v2's queries, keys and values, captured offline.
- `rotorquant.bench.timing`: interleaved CPU timing of the tiers.
- ``data/``: the shipped sentences.

Needs the ``bench`` extra (``pip install 'rotorquant[bench]'``).
"""
