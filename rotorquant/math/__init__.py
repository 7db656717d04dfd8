"""The mathematics behind the quantizers, in NumPy.

- `rotorquant.math.cl3`: the geometric algebra Cl(3,0) through clifford's own Cayley table, and the
  rotor sandwich ``R v R~``.
- `rotorquant.math.rotors`: rotors as 3x3 rotation matrices, Haar-random rotors and orthogonal matrices.
- `rotorquant.math.codebook`: Lloyd-Max codebooks for the exact density of one coordinate of a random
  unit vector.
"""
