"""Modules built on :mod:`matrec.ops`."""
