-- tallyd schema, version 4: a double-entry ledger with holds and credit limits (holds.sql, run after this file). tallyd runs this file inside one transaction when
-- it creates a database (then the seed adds accounts) and when it upgrades a version-1 database.
-- Amounts are integers in minor units (cents); STRICT tables refuse any value of another type, so no
-- float can reach a balance.

PRAGMA user_version = 4;

-- Every account: the cards, and '@world', the system account for the outside world that every deposit
-- comes from and every withdrawal goes to (it may go negative; it is not a card). opening_balance never
-- changes. balance and last_transaction_id (NULL before any) are the account's state as of the balance
-- checkpoint (ledger_checkpoint) or later: a commit only appends to transactions, and tallyd writes the
-- balances of the accounts that moved back here in the background. The current state is the view
-- current_accounts: this row, overridden by the account's last leg after the checkpoint.
CREATE TABLE ledger_accounts (
    name                TEXT    NOT NULL PRIMARY KEY
                        CHECK (name = '@world'
                               OR (length(name) BETWEEN 6 AND 19 AND name NOT GLOB '*[^0-9]*')),
    opening_balance     INTEGER NOT NULL CHECK (opening_balance >= 0 OR name = '@world'),
    -- May be negative down to the account's overdraft limit (account_credit); tallyd decides it and
    -- `tallyd verify` checks it, as a CHECK cannot read another table.
    balance             INTEGER NOT NULL,
    last_transaction_id INTEGER,
    created_at_ms       INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

INSERT INTO ledger_accounts (name, opening_balance, balance, created_at_ms)
VALUES ('@world', 0, 0, CAST(unixepoch('subsec') * 1000 AS INTEGER));

-- Every committed movement, appended (ids grow, so a batch only ever adds pages at the end): amount from
-- source to destination, as two legs that sum to zero. Each leg holds its account's balance after it and the
-- id of the account's previous transaction (NULL for its first), so an account's statement and its balance at
-- a moment are a walk down its chain from ledger_accounts.last_transaction_id, with no index to maintain.
-- Ids are assigned in commit order by the one writer and never reused.
CREATE TABLE transactions (
    id                        INTEGER NOT NULL PRIMARY KEY,
    kind                      TEXT    NOT NULL
                              CHECK (kind IN ('deposit', 'withdrawal', 'transfer', 'adjustment')),
    amount                    INTEGER NOT NULL CHECK (amount > 0 AND amount <= 1000000000000),
    source                    TEXT    NOT NULL,
    source_amount             INTEGER NOT NULL,
    source_balance_after      INTEGER NOT NULL,
    source_previous_id        INTEGER,
    destination               TEXT    NOT NULL CHECK (destination <> source),
    destination_amount        INTEGER NOT NULL,
    destination_balance_after INTEGER NOT NULL,
    destination_previous_id   INTEGER,
    reference                 TEXT    CHECK (reference IS NULL OR length(CAST(reference AS BLOB)) <= 255),
    idempotency_key           TEXT,
    created_at_ms             INTEGER NOT NULL
) STRICT;

-- The balance checkpoint: every ledger_accounts row holds its account's state after every leg with an id
-- up to transaction_id (some rows are further ahead). Start-up reads the rows and replays the
-- transactions after it; the background write-back moves it forward in the same SQLite transaction as
-- its last rows.
CREATE TABLE ledger_checkpoint (
    id             INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    transaction_id INTEGER NOT NULL
) STRICT;

INSERT INTO ledger_checkpoint (id, transaction_id) VALUES (1, 0);

-- History moved out by `tallyd archive`: every transaction with an id below archived_before_id went to the
-- archive file named here, and each account's opening_balance became its balance just before that id; the
-- first remaining leg of an account may link to an archived transaction. Empty until the first archive.
CREATE TABLE ledger_archive (
    archived_before_id INTEGER NOT NULL PRIMARY KEY,
    archive_file       TEXT    NOT NULL,
    transactions       INTEGER NOT NULL,
    archived_at_ms     INTEGER NOT NULL
) STRICT;

-- The answer first given to a request with an Idempotency-Key, written in the same transaction as its
-- effect, so that a retry gets the same answer and never a second effect. Appended in id order (ids are
-- assigned by the one writer, and created_at_ms never decreases with them), pruned by age from the start.
-- There is no index on the key: tallyd keeps an index of the live keys in memory, loaded at start-up, and
-- it is the one writer, so (scope, idempotency_key) is unique by construction; `tallyd verify` checks it.
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

CREATE TRIGGER transactions_are_immutable BEFORE UPDATE ON transactions
BEGIN
    SELECT RAISE(ABORT, 'transactions are immutable');
END;

CREATE TRIGGER transactions_are_permanent BEFORE DELETE ON transactions
BEGIN
    SELECT RAISE(ABORT, 'transactions are permanent');
END;

-- Every leg as a row: what verify and reading tools see as the double entry.
CREATE VIEW entries AS
SELECT source AS account, id AS transaction_id, source_amount AS amount,
       source_balance_after AS balance_after, source_previous_id AS previous_id
FROM transactions
UNION ALL
SELECT destination, id, destination_amount, destination_balance_after, destination_previous_id
FROM transactions;

-- Every account's current state: its checkpointed row, overridden by its last leg after the checkpoint.
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

-- The card accounts with their current balances, as version 1 stored them (reading tools keep working).
CREATE VIEW accounts AS
SELECT name AS card_number, opening_balance, balance, created_at_ms
FROM current_accounts
WHERE name <> '@world';

-- An operator may open an account by hand, as with version 1: INSERT INTO accounts (card_number,
-- opening_balance, balance) with balance equal to opening_balance.
CREATE TRIGGER accounts_insert INSTEAD OF INSERT ON accounts
BEGIN
    SELECT RAISE(ABORT, 'a new account''s balance must equal its opening_balance')
    WHERE NEW.balance IS NOT NULL AND NEW.balance <> NEW.opening_balance;
    INSERT INTO ledger_accounts (name, opening_balance, balance, created_at_ms)
    VALUES (NEW.card_number, NEW.opening_balance, NEW.opening_balance,
            coalesce(NEW.created_at_ms, CAST(unixepoch('subsec') * 1000 AS INTEGER)));
END;

-- Each card's legs, as version 1's journal stored them: id is the transaction's id.
CREATE VIEW journal AS
SELECT t.id, t.source AS card_number, t.source_amount AS amount, t.source_balance_after AS balance_after,
       t.created_at_ms
FROM transactions t WHERE t.source <> '@world'
UNION ALL
SELECT t.id, t.destination, t.destination_amount, t.destination_balance_after, t.created_at_ms
FROM transactions t WHERE t.destination <> '@world';
