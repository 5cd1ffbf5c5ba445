-- Holds and credit limits (schema version 4). tallyd runs this file after schema.sql when it creates a
-- database, and alone when it upgrades a version-3 one.

-- The accounts with an overdraft limit or pending holds (most have neither, so the table is small and
-- read whole at start-up). held is the sum of the account's pending holds, written in the same commit as
-- every hold placed or resolved; what the account may spend is balance - held + overdraft_limit.
CREATE TABLE account_credit (
    name            TEXT    NOT NULL PRIMARY KEY,
    overdraft_limit INTEGER NOT NULL CHECK (overdraft_limit BETWEEN 0 AND 1000000000000),
    held            INTEGER NOT NULL CHECK (held >= 0)
) STRICT, WITHOUT ROWID;

-- Every hold: amount reserved on card_number until it is captured (a transaction of captured_amount to
-- destination, or to the outside world when destination is NULL), voided or expired, exactly once.
-- Ids are assigned by the one writer, in order.
CREATE TABLE holds (
    id              INTEGER NOT NULL PRIMARY KEY,
    card_number     TEXT    NOT NULL,
    destination     TEXT    CHECK (destination IS NULL OR destination <> card_number),
    amount          INTEGER NOT NULL CHECK (amount > 0 AND amount <= 1000000000000),
    status          TEXT    NOT NULL CHECK (status IN ('pending', 'captured', 'voided', 'expired')),
    captured_amount INTEGER CHECK (captured_amount IS NULL OR (captured_amount > 0 AND captured_amount <= amount)),
    transaction_id  INTEGER,
    reference       TEXT    CHECK (reference IS NULL OR length(CAST(reference AS BLOB)) <= 255),
    created_at_ms   INTEGER NOT NULL,
    expires_at_ms   INTEGER NOT NULL,
    resolved_at_ms  INTEGER,
    CHECK ((status = 'captured') = (captured_amount IS NOT NULL AND transaction_id IS NOT NULL)),
    CHECK ((status = 'pending') = (resolved_at_ms IS NULL))
) STRICT;

-- An account's holds, newest first, for GET /accounts/{card}/holds.
CREATE INDEX holds_by_card ON holds (card_number, id);

-- A hold is resolved once: a captured, voided or expired hold never changes again.
CREATE TRIGGER holds_resolve_once BEFORE UPDATE ON holds
WHEN OLD.status <> 'pending'
BEGIN
    SELECT RAISE(ABORT, 'a hold is resolved once');
END;

CREATE TRIGGER holds_are_permanent BEFORE DELETE ON holds
BEGIN
    SELECT RAISE(ABORT, 'holds are permanent');
END;

-- Every account's spending position: its current balance, what is held, its limit and what is available.
CREATE VIEW account_availability AS
SELECT a.name, a.balance, coalesce(c.held, 0) AS held, coalesce(c.overdraft_limit, 0) AS overdraft_limit,
       a.balance - coalesce(c.held, 0) + coalesce(c.overdraft_limit, 0) AS available
FROM current_accounts a
LEFT JOIN account_credit c ON c.name = a.name
WHERE a.name <> '@world';
