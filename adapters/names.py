"""The names of the LoRA adapters that share one resident base model.

- ``knowledge``: what was learned (every wake commit and sleep is a version of it);
- ``editor``: how to write self-edits (trained by ReST-EM in sleep);
- ``trial``: scratch space, where a candidate update is trained before anything is
  committed (never saved under its own name).
"""

KNOWLEDGE, EDITOR, TRIAL = "knowledge", "editor", "trial"

SAVED = (KNOWLEDGE, EDITOR)  # the names whose versions the registry keeps
