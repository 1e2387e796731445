"""Experiments as files: a grid of ordinary training runs (`matrec experiment run`) and a report
built from run directories alone (`matrec experiment report`); docs/experiments.md describes both.

The modules: ``spec`` (reading and checking a file), ``runner`` (running cells; the inline, local
and Ray backends), ``report``, ``cli``. This package file imports none of them, so the ``matrec``
command's start stays light.
"""
