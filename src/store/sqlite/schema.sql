-- tallyd schema, version 2: a double-entry ledger. tallyd runs this file inside one transaction when
-- it creates a database (then the seed adds accounts) and when it upgrades a version-1 database.
-- Amounts are integers in minor units (cents); STRICT tables refuse any value of another type, so no
-- float can reach a balance.

PRAGMA user_version = 2;

-- Every account: the cards, and '@world', the system account for the outside world that every deposit
-- comes from and every withdrawal goes to (it may go negative; it is not a card). opening_balance never
-- changes; balance is the balance after the account's last transaction, last_transaction_id (NULL before
-- any), the head of the chain of its transactions. Both are updated in place once per batch that touches
-- the account, so a commit rewrites rows where they are and never splits this table's pages.
CREATE TABLE ledger_accounts (
    name                TEXT    NOT NULL PRIMARY KEY
                        CHECK (name = '@world'
                               OR (length(name) BETWEEN 6 AND 19 AND name NOT GLOB '*[^0-9]*')),
    opening_balance     INTEGER NOT NULL CHECK (opening_balance >= 0 OR name = '@world'),
    balance             INTEGER NOT NULL CHECK (balance >= 0 OR name = '@world'),
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
    source_balance_after      INTEGER NOT NULL CHECK (source_balance_after >= 0 OR source = '@world'),
    source_previous_id        INTEGER,
    destination               TEXT    NOT NULL CHECK (destination <> source),
    destination_amount        INTEGER NOT NULL,
    destination_balance_after INTEGER NOT NULL
                              CHECK (destination_balance_after >= 0 OR destination = '@world'),
    destination_previous_id   INTEGER,
    reference                 TEXT    CHECK (reference IS NULL OR length(CAST(reference AS BLOB)) <= 255),
    idempotency_key           TEXT,
    created_at_ms             INTEGER NOT NULL
) STRICT;

-- The answer first given to a request with an Idempotency-Key, written in the same transaction as its
-- effect, so that a retry gets the same answer and never a second effect. Pruned by age.
CREATE TABLE idempotency_keys (
    scope           TEXT    NOT NULL,
    idempotency_key TEXT    NOT NULL,
    fingerprint     TEXT    NOT NULL,
    status          INTEGER NOT NULL,
    body            BLOB    NOT NULL,
    transaction_id  INTEGER,
    created_at_ms   INTEGER NOT NULL,
    PRIMARY KEY (scope, idempotency_key)
) STRICT, WITHOUT ROWID;

CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at_ms);

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

-- The card accounts with their balances, as version 1 stored them (reading tools keep working).
CREATE VIEW accounts AS
SELECT name AS card_number, opening_balance, balance, created_at_ms
FROM ledger_accounts
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
