-- Upgrade a version-1 database (accounts with balances, a journal of signed amounts) to the ledger. tallyd
-- runs, in one transaction: the renames in schema.rs (V1_SET_ASIDE), src/store/schema.sql, then this file:
-- every journal row becomes a deposit or a withdrawal between its card and '@world' with the same id, time
-- and balance_after, linked into both accounts' chains; then the old tables go. tallyd checks the version-1 invariants first.

INSERT INTO ledger_accounts (name, opening_balance, balance, last_transaction_id, created_at_ms)
SELECT a.card_number, a.opening_balance, a.balance,
       (SELECT max(j.id) FROM v1_journal j WHERE j.card_number = a.card_number),
       -- Version 1 kept no opening time: the account's first transaction's, or the upgrade's.
       coalesce((SELECT min(j.created_at_ms) FROM v1_journal j WHERE j.card_number = a.card_number),
                CAST(unixepoch('subsec') * 1000 AS INTEGER))
FROM v1_accounts a;

-- Each journal row with the chains it joins: its card's previous row, and the outside world's (every row).
CREATE TEMP TABLE v1_legs AS
SELECT id, card_number, amount, balance_after, created_at_ms,
       LAG(id) OVER (PARTITION BY card_number ORDER BY id) AS card_previous_id,
       LAG(id) OVER (ORDER BY id) AS world_previous_id,
       -SUM(amount) OVER (ORDER BY id ROWS UNBOUNDED PRECEDING) AS world_balance_after
FROM v1_journal;

INSERT INTO transactions (id, kind, amount,
                          source, source_amount, source_balance_after, source_previous_id,
                          destination, destination_amount, destination_balance_after, destination_previous_id,
                          reference, idempotency_key, created_at_ms)
SELECT id, 'deposit', amount,
       '@world', -amount, world_balance_after, world_previous_id,
       card_number, amount, balance_after, card_previous_id,
       NULL, NULL, created_at_ms
FROM v1_legs WHERE amount > 0
UNION ALL
SELECT id, 'withdrawal', -amount,
       card_number, amount, balance_after, card_previous_id,
       '@world', -amount, world_balance_after, world_previous_id,
       NULL, NULL, created_at_ms
FROM v1_legs WHERE amount < 0
ORDER BY 1;

UPDATE ledger_accounts
SET balance = coalesce((SELECT -SUM(amount) FROM v1_journal), 0),
    last_transaction_id = (SELECT max(id) FROM v1_journal)
WHERE name = '@world';

-- Every balance above is current: the checkpoint is at the last transaction.
UPDATE ledger_checkpoint SET transaction_id = coalesce((SELECT max(id) FROM transactions), 0);

DROP TABLE v1_legs;
DROP TABLE v1_journal;
DROP TABLE v1_accounts;
