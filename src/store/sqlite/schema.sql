-- tallyd schema, version 2: a double-entry ledger. tallyd runs this file inside one transaction when
-- it creates a database (then the seed adds accounts) and when it upgrades a version-1 database.
-- Amounts are integers in minor units (cents); STRICT tables refuse any value of another type, so no
-- float can reach a balance.

PRAGMA user_version = 2;

-- Every account: the cards, and '@world', the system account for the outside world that every deposit
-- comes from and every withdrawal goes to (it may go negative; it is not a card). opening_balance never
-- changes. An account's balance is its last entry's balance_after, or its opening balance before any.
CREATE TABLE ledger_accounts (
    name            TEXT    NOT NULL PRIMARY KEY
                    CHECK (name = '@world'
                           OR (length(name) BETWEEN 6 AND 19 AND name NOT GLOB '*[^0-9]*')),
    opening_balance INTEGER NOT NULL CHECK (opening_balance >= 0 OR name = '@world'),
    created_at_ms   INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

INSERT INTO ledger_accounts (name, opening_balance, created_at_ms)
VALUES ('@world', 0, CAST(unixepoch('subsec') * 1000 AS INTEGER));

-- Every committed movement: amount from source to destination. Ids are assigned in commit order by the
-- one writer and never reused.
CREATE TABLE transactions (
    id              INTEGER NOT NULL PRIMARY KEY,
    kind            TEXT    NOT NULL CHECK (kind IN ('deposit', 'withdrawal', 'transfer', 'adjustment')),
    source          TEXT    NOT NULL,
    destination     TEXT    NOT NULL CHECK (destination <> source),
    amount          INTEGER NOT NULL CHECK (amount > 0 AND amount <= 1000000000000),
    reference       TEXT    CHECK (reference IS NULL OR length(CAST(reference AS BLOB)) <= 255),
    idempotency_key TEXT,
    created_at_ms   INTEGER NOT NULL
) STRICT;

-- The legs: one per account a transaction touches, summing to zero per transaction. Clustered by account
-- so that an account's statement, its balance at a time and its current balance are one range read, and
-- a batch's inserts land on one page per account it touches.
CREATE TABLE entries (
    account        TEXT    NOT NULL,
    transaction_id INTEGER NOT NULL,
    amount         INTEGER NOT NULL CHECK (amount <> 0),
    balance_after  INTEGER NOT NULL CHECK (balance_after >= 0 OR account = '@world'),
    PRIMARY KEY (account, transaction_id)
) STRICT, WITHOUT ROWID;

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

CREATE TRIGGER entries_are_immutable BEFORE UPDATE ON entries
BEGIN
    SELECT RAISE(ABORT, 'entries are immutable');
END;

CREATE TRIGGER entries_are_permanent BEFORE DELETE ON entries
BEGIN
    SELECT RAISE(ABORT, 'entries are permanent');
END;

-- The card accounts with their current balances, as version 1 stored them (reading tools keep working).
CREATE VIEW accounts AS
SELECT a.name AS card_number,
       a.opening_balance,
       coalesce((SELECT e.balance_after FROM entries e WHERE e.account = a.name
                 ORDER BY e.transaction_id DESC LIMIT 1), a.opening_balance) AS balance,
       a.created_at_ms
FROM ledger_accounts a
WHERE a.name <> '@world';

-- An operator may open an account by hand, as with version 1: INSERT INTO accounts (card_number,
-- opening_balance, balance) with balance equal to opening_balance.
CREATE TRIGGER accounts_insert INSTEAD OF INSERT ON accounts
BEGIN
    SELECT RAISE(ABORT, 'a new account''s balance must equal its opening_balance')
    WHERE NEW.balance IS NOT NULL AND NEW.balance <> NEW.opening_balance;
    INSERT INTO ledger_accounts (name, opening_balance, created_at_ms)
    VALUES (NEW.card_number, NEW.opening_balance,
            coalesce(NEW.created_at_ms, CAST(unixepoch('subsec') * 1000 AS INTEGER)));
END;

-- Each card's legs, as version 1's journal stored them: id is the transaction's id.
CREATE VIEW journal AS
SELECT e.transaction_id AS id, e.account AS card_number, e.amount, e.balance_after, t.created_at_ms
FROM entries e JOIN transactions t ON t.id = e.transaction_id
WHERE e.account <> '@world';
