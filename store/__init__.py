"""seal's SQLite store. Imports nothing of the project: everything else imports it."""

from .db import IngestOutcome, Job, NewDocument, NewPassage, NewQuestion, Store

__all__ = ["IngestOutcome", "Job", "NewDocument", "NewPassage", "NewQuestion", "Store"]
