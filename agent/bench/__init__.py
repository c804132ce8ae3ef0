"""Reproducible benchmarks (`seal bench ...`): each prints a table and writes JSON.

- ``squad``: SEAL's single-passage knowledge-incorporation protocol;
- ``editor``: ReST-EM on the self-edit writer, on passages never evaluated;
- ``continual``: passages learned in sequence, the forgetting matrix with and without sleep;
- ``speed``: where one wake cycle spends its time, beside SEAL's reference settings;
- ``views``: how long the dashboard takes to draw a long history (no model);
- ``common``: the data, the seeded draws and the statistics they share;
- ``cli``: the `seal bench` commands and their tables.
"""
