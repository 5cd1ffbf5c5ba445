-- Upgrade a version-1 database (accounts with balances, a journal of signed amounts) to version 2. tallyd
-- runs, in one transaction: the renames in sqlite.rs (V1_SET_ASIDE), src/store/schema.sql, then this file:
-- every journal row becomes a deposit or a withdrawal between its card and '@world' with the same id, time
-- and balance_after; then the old tables go. tallyd checks the version-1 invariants first.

INSERT INTO ledger_accounts (name, opening_balance, created_at_ms)
SELECT card_number, opening_balance, CAST(unixepoch('subsec') * 1000 AS INTEGER) FROM v1_accounts;

INSERT INTO transactions (id, kind, source, destination, amount, reference, idempotency_key, created_at_ms)
SELECT id,
       CASE WHEN amount > 0 THEN 'deposit' ELSE 'withdrawal' END,
       CASE WHEN amount > 0 THEN '@world' ELSE card_number END,
       CASE WHEN amount > 0 THEN card_number ELSE '@world' END,
       abs(amount), NULL, NULL, created_at_ms
FROM v1_journal;

INSERT INTO entries (account, transaction_id, amount, balance_after)
SELECT card_number, id, amount, balance_after FROM v1_journal;

INSERT INTO entries (account, transaction_id, amount, balance_after)
SELECT '@world', id, -amount, -SUM(amount) OVER (ORDER BY id) FROM v1_journal;

DROP TABLE v1_journal;
DROP TABLE v1_accounts;
