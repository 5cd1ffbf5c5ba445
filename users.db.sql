-- tallyd: the seed accounts of a new database. tallyd runs this file once, inside the same transaction as
-- the schema (src/store/schema.sql), when it creates a database; `--seed FILE` replaces it.

-- The demo card of the README's examples: 1,000.00.
INSERT INTO ledger_accounts (name, opening_balance, balance, created_at_ms)
VALUES ('1234567890', 100000, 100000, CAST(unixepoch('subsec') * 1000 AS INTEGER));

-- 100,000 deterministic cards for load tests: 4000000000000001 .. 4000000000100000, each opening
-- with 1,000.00 plus (n mod 1000) whole units, so that balances differ but are easy to recompute.
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100000)
INSERT INTO ledger_accounts (name, opening_balance, balance, created_at_ms)
SELECT printf('4%015d', i), 100000 + (i % 1000) * 100, 100000 + (i % 1000) * 100, CAST(unixepoch('subsec') * 1000 AS INTEGER) FROM n;
