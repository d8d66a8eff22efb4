"""Sweeps: a grid over an experiment spec, each cell an idempotent run (local or Ray), and one report across them."""
from sublim.sweep.grid import Cell, cells, parse_grid
from sublim.sweep.report import sweep_report
from sublim.sweep.run import run_cell, sweep

__all__ = ["Cell", "cells", "parse_grid", "run_cell", "sweep", "sweep_report"]
