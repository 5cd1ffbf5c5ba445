-- tallyd: schema and seed accounts. tallyd runs this file once, inside one transaction, when it
-- creates a new database. Amounts are integers in minor units (cents); STRICT tables refuse any
-- value of another type, so no float can reach a balance.

PRAGMA user_version = 1;

-- One row per card. opening_balance never changes: balance = opening_balance + SUM(journal.amount)
-- is the invariant that `tallyd verify` checks.
CREATE TABLE accounts (
    card_number     TEXT    NOT NULL PRIMARY KEY
                    CHECK (length(card_number) BETWEEN 6 AND 19 AND card_number NOT GLOB '*[^0-9]*'),
    opening_balance INTEGER NOT NULL CHECK (opening_balance >= 0),
    balance         INTEGER NOT NULL CHECK (balance >= 0)
) STRICT, WITHOUT ROWID;

-- Every committed transaction, appended in the same SQLite transaction as its balance change.
-- Rows are never updated or deleted (the triggers below refuse it), so an id stays valid forever.
CREATE TABLE journal (
    id            INTEGER NOT NULL PRIMARY KEY,
    card_number   TEXT    NOT NULL,
    amount        INTEGER NOT NULL CHECK (amount <> 0),
    balance_after INTEGER NOT NULL CHECK (balance_after >= 0),
    created_at_ms INTEGER NOT NULL
) STRICT;

CREATE TRIGGER journal_rows_are_immutable BEFORE UPDATE ON journal
BEGIN
    SELECT RAISE(ABORT, 'journal rows are immutable');
END;

CREATE TRIGGER journal_rows_are_permanent BEFORE DELETE ON journal
BEGIN
    SELECT RAISE(ABORT, 'journal rows are permanent');
END;

-- The demo card of the README's examples: 1,000.00.
INSERT INTO accounts (card_number, opening_balance, balance) VALUES ('1234567890', 100000, 100000);

-- 100,000 deterministic cards for load tests: 4000000000000001 .. 4000000000100000, each opening
-- with 1,000.00 plus (n mod 1000) whole units, so that balances differ but are easy to recompute.
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100000)
INSERT INTO accounts (card_number, opening_balance, balance)
SELECT printf('4%015d', i), 100000 + (i % 1000) * 100, 100000 + (i % 1000) * 100 FROM n;
