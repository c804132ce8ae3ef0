"""Ordered, transactional schema migrations (sqlite-utils 4 ``Migrations``).

Each function runs inside one transaction together with the record that it ran, so a
crash mid-migration leaves the schema as it was. Never edit a released migration: add
a new one below it.
"""

from sqlite_utils import Database, Migrations

migrations = Migrations("seal")


@migrations(name="0001_ingest")
def ingest_tables(db: Database) -> None:
    db["documents"].create(
        {
            "id": int,
            "sha256": str,  # of the document's normalised text: duplicate detection
            "source": str,  # path as given, or "-" for stdin
            "title": str,
            "kind": str,  # txt | md | json | jsonl
            "bytes": int,
            "n_passages": int,
            "ingested_at": float,
        },
        pk="id",
        not_null=["sha256", "source", "kind", "ingested_at"],
    )
    db["documents"].create_index(["sha256"], unique=True)
    db["passages"].create(
        {
            "id": int,
            "document_id": int,
            "seq": int,  # order within the document
            "title": str,
            "text": str,
            "sha256": str,
            "n_tokens": int,
            "created_at": float,
        },
        pk="id",
        foreign_keys=[("document_id", "documents", "id")],
        not_null=["document_id", "seq", "text", "sha256"],
    )
    db["passages"].create_index(["sha256"], unique=True)
    db["questions"].create(
        {
            "id": int,
            "passage_id": int,
            "question": str,
            "answer": str,
            "origin": str,  # user | self
            "role": str,  # reward | probe | None (not yet split)
            "created_at": float,
        },
        pk="id",
        foreign_keys=[("passage_id", "passages", "id")],
        not_null=["passage_id", "question", "answer", "origin"],
    )
    db["questions"].create_index(["passage_id"])
    db["jobs"].create(
        {
            "id": int,
            "passage_id": int,
            "kind": str,  # learn
            "state": str,  # pending | claimed | done | failed
            "attempts": int,
            "claimed_by": str,
            "heartbeat_at": float,
            "error": str,
            "created_at": float,
            "updated_at": float,
        },
        pk="id",
        foreign_keys=[("passage_id", "passages", "id")],
        not_null=["passage_id", "kind", "state", "attempts", "created_at"],
        defaults={"attempts": 0},
    )
    db["jobs"].create_index(["state", "id"])
    db["events"].create(
        {"id": int, "at": float, "kind": str, "detail": str},
        pk="id",
        not_null=["at", "kind"],
    )
    db["state"].create({"key": str, "value": str}, pk="key")


@migrations(name="0002_learning")
def learning_tables(db: Database) -> None:
    db["adapters"].create(
        {
            "id": str,  # e.g. knowledge-0003
            "name": str,  # knowledge | editor
            "version": int,
            "parent_id": str,
            "kind": str,  # wake | sleep
            "passage_id": int,
            "path": str,  # relative to the home's adapters/ folder
            "sha256": str,  # of adapter_model.safetensors
            "policy": str,
            "reward": float,
            "metrics": str,  # JSON
            "status": str,  # committed | rolled_back | pruned
            "created_at": float,
        },
        pk="id",
        not_null=["name", "version", "kind", "path", "sha256", "status", "created_at"],
    )
    db["adapters"].create_index(["name", "version"], unique=True)
    db["cycles"].create(
        {
            "id": int,
            "passage_id": int,
            "job_id": int,
            "started_at": float,
            "finished_at": float,
            "outcome": str,  # committed | rejected | failed
            "reason": str,
            "parent_adapter": str,
            "adapter_id": str,
            "baseline_logprob": float,
            "baseline_acc": float,
            "n_reward": int,
            "n_probe": int,
            "timings": str,  # JSON: step -> seconds
            "tokens": str,  # JSON: step -> tokens
        },
        pk="id",
        not_null=["passage_id", "started_at"],
    )
    db["candidates"].create(
        {
            "id": int,
            "cycle_id": int,
            "passage_id": int,
            "policy": str,
            "idx": int,
            "text": str,
            "prompt": str,
            "n_tokens": int,
            "n_examples": int,
            "reward_logprob": float,  # mean gain in answer log-likelihood over baseline
            "reward_acc": float,  # closed-book accuracy on reward questions
            "reward_f1": float,
            "train_loss": float,
            "gen_seconds": float,
            "train_seconds": float,
            "score_seconds": float,
            "chosen": int,
            "note": str,
            "created_at": float,
        },
        pk="id",
        foreign_keys=[("cycle_id", "cycles", "id")],
        not_null=["cycle_id", "passage_id", "policy", "idx", "created_at"],
    )
    db["candidates"].create_index(["passage_id"])
    db["evaluations"].create(
        {
            "id": int,
            "adapter_id": str,  # NULL = the base model
            "passage_id": int,
            "kind": str,  # probe | reward
            "accuracy": float,
            "f1": float,
            "logprob": float,  # mean answer log-likelihood per token
            "n": int,
            "at": float,
        },
        pk="id",
        not_null=["kind", "n", "at"],
    )
    db["evaluations"].create_index(["adapter_id", "passage_id"])


@migrations(name="0003_sleep")
def sleep_tables(db: Database) -> None:
    """Sleep reports, ReST-EM rounds on the editor, and the two per-version trackers
    beside the forgetting matrix (which lives in ``evaluations``): general drift and
    verbatim memorisation."""
    db["sleeps"].create(
        {
            "id": int,
            "started_at": float,
            "finished_at": float,
            "trigger": str,  # manual | interval | commits | idle | cron | bench
            "policy": str,  # replay | dream | merge
            "outcome": str,  # kept | rolled_back | skipped | failed
            "reason": str,
            "parent_adapter": str,  # the knowledge version before the sleep
            "adapter_id": str,  # the consolidated version, when kept
            "before": str,  # JSON: retention, drift_kl, reading_acc, memorisation
            "after": str,  # JSON: the same, measured on the consolidated weights
            "n_examples": int,  # replayed self-edit examples
            "n_dreams": int,  # free generations mixed in
            "train_loss": float,
            "timings": str,  # JSON: step -> seconds
        },
        pk="id",
        not_null=["started_at", "trigger", "policy", "outcome"],
    )
    db["editor_rounds"].create(
        {
            "id": int,
            "sleep_id": int,
            "started_at": float,
            "finished_at": float,
            "outcome": str,  # kept | rejected | skipped
            "reason": str,
            "parent_adapter": str,  # the editor version before the round (NULL: none)
            "adapter_id": str,  # the new editor version, when kept
            "n_pairs": int,  # (passage -> self-edit) pairs trained on
            "n_heldout": int,  # held-out passages the reward was measured on
            "train_loss": float,
            "reward_before": float,  # mean reward of self-edits written before the round
            "reward_after": float,  # ... and after it, on the same held-out passages
            "detail": str,  # JSON
        },
        pk="id",
        not_null=["started_at", "outcome"],
    )
    db["drift"].create(
        {
            "id": int,
            "adapter_id": str,  # NULL = the base model
            "kl": float,  # mean per-token KL(base || model) on the fixed generic prompts
            "reading_acc": float,  # open-book accuracy on the fixed held-out reading set
            "n_prompts": int,
            "n_reading": int,
            "at": float,
        },
        pk="id",
        not_null=["at"],
    )
    db["drift"].create_index(["adapter_id"])
    db["memorisation"].create(
        {
            "id": int,
            "adapter_id": str,  # NULL = the base model
            "passage_id": int,
            "exact": int,  # 1 if the greedy continuation equals the true text
            "token_match": float,  # fraction of continuation tokens equal to the true ones
            "prefix_tokens": int,
            "n_tokens": int,  # continuation length compared
            "at": float,
        },
        pk="id",
        foreign_keys=[("passage_id", "passages", "id")],
        not_null=["passage_id", "exact", "token_match", "at"],
    )
    db["memorisation"].create_index(["adapter_id", "passage_id"])


@migrations(name="0004_transfer_sets")
def transfer_sets(db: Database) -> None:
    """A distillation candidate's answered transfer set (JSON: kind, student and
    teacher prompts, answer, how, ended), so that a sleep re-distils it without writing
    it anew; and the reward that selected (``policies.reward``: it may be neither of
    the two recorded gains, e.g. the label-free teacher agreement)."""
    db["candidates"].add_column("transfer", str)
    db["candidates"].add_column("reward", float)


@migrations(name="0005_scale_indexes")
def scale_indexes(db: Database) -> None:
    """Indexes the queries of a large store need: ReST-EM's pairs look candidates up by
    cycle, the passage overview looks cycles up by passage (both scanned whole tables
    before; issue 13 measured them on a synthetic store of 10,000 learned passages)."""
    db["candidates"].create_index(["cycle_id"], if_not_exists=True)
    db["cycles"].create_index(["passage_id"], if_not_exists=True)


@migrations(name="0006_window_indexes")
def window_indexes(db: Database) -> None:
    """The dashboard reads a window (the passages learned last, the newest versions,
    the passages of the newest cycles): their probe measurements, their jobs and the
    versions that learned them are looked up by passage."""
    db["evaluations"].create_index(["passage_id"], if_not_exists=True)
    db["jobs"].create_index(["passage_id"], if_not_exists=True)
    db["adapters"].create_index(["passage_id"], if_not_exists=True)
    # covering indexes: the learned passages (every wake cycle and sleep asks) and each
    # passage's wake versions are read from the index alone
    db["cycles"].create_index(["outcome", "passage_id"], if_not_exists=True)
    db["adapters"].create_index(["name", "kind", "passage_id", "version", "status"], if_not_exists=True)


@migrations(name="0007_job_deferrals")
def job_deferrals(db: Database) -> None:
    """How often a temporary fault gave a job back: a deferred job waits behind fresh
    ones, and one deferred too often is marked failed (a fault that does not go away
    is the passage's after all), so that nothing loops for ever."""
    db["jobs"].add_column("deferrals", int, not_null_default=0)
    db["jobs"].create_index(["state", "deferrals", "id"], if_not_exists=True)


@migrations(name="0008_heartbeat_indexes")
def heartbeat_indexes(db: Database) -> None:
    """What every daemon cycle and heartbeat reads, by index rather than by scanning a
    table that grows with every passage: the versions not yet pruned (the prune plan),
    versions by folder (recovery), the commits since the last sleep (the schedule) and
    the last sleep itself."""
    db.execute("CREATE INDEX IF NOT EXISTS idx_adapters_live ON adapters(name, version) WHERE status != 'pruned'")
    db["adapters"].create_index(["path"], if_not_exists=True)
    db["adapters"].create_index(["name", "kind", "created_at"], if_not_exists=True)
    db["sleeps"].create_index(["started_at"], if_not_exists=True)


# A wake version that counts as learning its passage (``first_learned``'s predicate).
_LEARNS = "{r}.kind = 'wake' AND {r}.passage_id IS NOT NULL AND {r}.status != 'rolled_back'"
_OTHER_LEARNS = ("EXISTS (SELECT 1 FROM adapters b WHERE b.passage_id = {r}.passage_id AND b.name = {r}.name "
                 "AND b.id != {r}.id AND b.kind = 'wake' AND b.status != 'rolled_back')")


@migrations(name="0009_counters")
def counters(db: Database) -> None:
    """Counts that every status read and dashboard draw shows, kept by triggers in the
    transaction of the change that moves them, so that reading them costs the same at
    10,000 passages as at 10 (counting jobs by state, or the learned passages, scanned
    an index that grows with every passage): jobs by state, and per adapter name the
    passages learned (having a wake version not rolled back)."""
    db.execute("CREATE TABLE job_counts (state TEXT PRIMARY KEY, n INTEGER NOT NULL)")
    db.execute("INSERT INTO job_counts SELECT state, COUNT(*) FROM jobs GROUP BY state")
    db.execute("CREATE TABLE learned_counts (name TEXT PRIMARY KEY, n INTEGER NOT NULL)")
    db.execute(f"INSERT INTO learned_counts SELECT a.name, COUNT(DISTINCT a.passage_id) FROM adapters a "
               f"WHERE {_LEARNS.format(r='a')} GROUP BY a.name")

    def bump(table: str, key: str, value: str, by: int) -> str:
        return (f"INSERT OR IGNORE INTO {table} VALUES ({value}, 0); "
                f"UPDATE {table} SET n = n + ({by}) WHERE {key} = {value};")

    db.execute(f"CREATE TRIGGER job_counts_insert AFTER INSERT ON jobs BEGIN "
               f"{bump('job_counts', 'state', 'NEW.state', 1)} END")
    db.execute(f"CREATE TRIGGER job_counts_delete AFTER DELETE ON jobs BEGIN "
               f"{bump('job_counts', 'state', 'OLD.state', -1)} END")
    db.execute(f"CREATE TRIGGER job_counts_update AFTER UPDATE OF state ON jobs WHEN OLD.state IS NOT NEW.state "
               f"BEGIN {bump('job_counts', 'state', 'OLD.state', -1)} {bump('job_counts', 'state', 'NEW.state', 1)} END")
    # a passage's first learning version adds it, its last one taken away removes it
    # (kind, name and passage_id never change after insert: only status does)
    new, old = _LEARNS.format(r="NEW"), _LEARNS.format(r="OLD")
    db.execute(f"CREATE TRIGGER learned_counts_insert AFTER INSERT ON adapters "
               f"WHEN {new} AND NOT {_OTHER_LEARNS.format(r='NEW')} BEGIN "
               f"{bump('learned_counts', 'name', 'NEW.name', 1)} END")
    db.execute(f"CREATE TRIGGER learned_counts_delete AFTER DELETE ON adapters "
               f"WHEN {old} AND NOT {_OTHER_LEARNS.format(r='OLD')} BEGIN "
               f"{bump('learned_counts', 'name', 'OLD.name', -1)} END")
    db.execute(f"CREATE TRIGGER learned_counts_update AFTER UPDATE OF status ON adapters "
               f"WHEN ({new}) IS NOT ({old}) AND NOT {_OTHER_LEARNS.format(r='NEW')} BEGIN "
               f"{bump('learned_counts', 'name', 'NEW.name', f'CASE WHEN {new} THEN 1 ELSE -1 END')} END")
