"""The model families behind the one pipeline, each a package of its own.

A family is its components (the models with their weight maps and configs, under
:mod:`mlx_i2v.models` ``.wan`` / ``.ltx``) plus what it brings to the shared pipeline, loader and planner,
here: its variants and :class:`~mlx_i2v.family.Family` strategies, its memory model for the planner
(a :class:`~mlx_i2v.planner.FamilyDims`) and its component loader. Nothing outside a family's packages
names its models.
"""
