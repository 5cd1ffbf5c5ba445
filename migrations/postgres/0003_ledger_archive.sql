-- tallyd on PostgreSQL, schema version 3: the cuts of `tallyd archive`, the table SQLite keeps beside
-- its ledger (src/store/sqlite/schema.sql), for a SQLite ledger that was archived before `tallyd migrate`
-- copied it here. Every transaction with an id below archived_before_id went to the archive file named
-- here, and each account's opening_balance became its balance just before that id, so an account's first
-- remaining leg may link to an archived transaction and a captured hold may name one; `verify` accepts
-- exactly those links. Empty on a ledger that was never archived.

CREATE TABLE ledger_archive (
    archived_before_id bigint NOT NULL PRIMARY KEY CHECK (archived_before_id > 0),
    archive_file       text   NOT NULL,
    transactions       bigint NOT NULL,
    archived_at_ms     bigint NOT NULL
);
