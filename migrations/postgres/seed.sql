-- tallyd on PostgreSQL: the seed accounts of a new database, the same as users.db.sql makes on
-- SQLite. Run once, in the transaction that creates the schema; `--seed FILE` replaces it.

-- The demo card of the README's examples: 1,000.00.
INSERT INTO ledger_accounts (name, opening_balance, balance, created_at_ms)
VALUES ('1234567890', 100000, 100000, (extract(epoch FROM clock_timestamp()) * 1000)::bigint);

-- 100,000 deterministic cards for load tests: 4000000000000001 .. 4000000000100000, each opening
-- with 1,000.00 plus (n mod 1000) whole units.
INSERT INTO ledger_accounts (name, opening_balance, balance, created_at_ms)
SELECT '4' || lpad(i::text, 15, '0'), 100000 + (i % 1000) * 100, 100000 + (i % 1000) * 100,
       (extract(epoch FROM clock_timestamp()) * 1000)::bigint
FROM generate_series(1, 100000) AS i;
