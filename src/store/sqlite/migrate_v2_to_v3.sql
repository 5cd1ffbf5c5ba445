-- Upgrade a version-2 database to version 3, in one transaction (schema.rs runs it): balances are written
-- back in the background now, so a checkpoint says how far ledger_accounts is current (all of it, at the
-- upgrade); idempotency records are appended with ids instead of kept in a B-tree ordered by key (the
-- index of live keys is in tallyd's memory), oldest first so that pruning by age still starts at the
-- lowest id; and the accounts view reads current balances.

PRAGMA user_version = 3;

CREATE TABLE ledger_checkpoint (
    id             INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    transaction_id INTEGER NOT NULL
) STRICT;

INSERT INTO ledger_checkpoint (id, transaction_id)
SELECT 1, coalesce(max(id), 0) FROM transactions;

-- History moved out by `tallyd archive`: every transaction with an id below archived_before_id went to the
-- archive file named here, and each account's opening_balance became its balance just before that id; the
-- first remaining leg of an account may link to an archived transaction. Empty until the first archive.
CREATE TABLE ledger_archive (
    archived_before_id INTEGER NOT NULL PRIMARY KEY,
    archive_file       TEXT    NOT NULL,
    transactions       INTEGER NOT NULL,
    archived_at_ms     INTEGER NOT NULL
) STRICT;

ALTER TABLE idempotency_keys RENAME TO v2_idempotency_keys;
DROP INDEX idempotency_keys_by_age;

CREATE TABLE idempotency_keys (
    id              INTEGER NOT NULL PRIMARY KEY,
    scope           TEXT    NOT NULL,
    idempotency_key TEXT    NOT NULL,
    fingerprint     TEXT    NOT NULL,
    status          INTEGER NOT NULL,
    body            BLOB    NOT NULL,
    transaction_id  INTEGER,
    created_at_ms   INTEGER NOT NULL
) STRICT;

INSERT INTO idempotency_keys (scope, idempotency_key, fingerprint, status, body, transaction_id, created_at_ms)
SELECT scope, idempotency_key, fingerprint, status, body, transaction_id, created_at_ms
FROM v2_idempotency_keys
ORDER BY created_at_ms, transaction_id;

DROP TABLE v2_idempotency_keys;

DROP TRIGGER accounts_insert;
DROP VIEW accounts;

CREATE VIEW current_accounts AS
SELECT a.name, a.opening_balance,
       coalesce(t.balance_after, a.balance) AS balance,
       coalesce(t.last_id, a.last_transaction_id) AS last_transaction_id,
       a.created_at_ms
FROM ledger_accounts a
LEFT JOIN (SELECT account, balance_after, max(transaction_id) AS last_id
           FROM entries
           WHERE transaction_id > (SELECT transaction_id FROM ledger_checkpoint)
           GROUP BY account) t ON t.account = a.name;

CREATE VIEW accounts AS
SELECT name AS card_number, opening_balance, balance, created_at_ms
FROM current_accounts
WHERE name <> '@world';

CREATE TRIGGER accounts_insert INSTEAD OF INSERT ON accounts
BEGIN
    SELECT RAISE(ABORT, 'a new account''s balance must equal its opening_balance')
    WHERE NEW.balance IS NOT NULL AND NEW.balance <> NEW.opening_balance;
    INSERT INTO ledger_accounts (name, opening_balance, balance, created_at_ms)
    VALUES (NEW.card_number, NEW.opening_balance, NEW.opening_balance,
            coalesce(NEW.created_at_ms, CAST(unixepoch('subsec') * 1000 AS INTEGER)));
END;
