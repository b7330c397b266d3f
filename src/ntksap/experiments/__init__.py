"""Experiments: sweeps over methods x sparsities x seeds (and any setting), a results index
rebuilt from the run folders, and reports with tables and plots.

    records.py  what one run folder says (config, result, status), read from its files
    sweep.py    grids from TOML or flags, run-folder naming by config hash, shards, executors
    index.py    SQLite index of a sweep folder (WAL), rebuilt from the run folders at any time
    report.py   tables (markdown, CSV) and plots, beside the paper's published numbers
"""
