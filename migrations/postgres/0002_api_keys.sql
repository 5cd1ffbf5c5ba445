-- tallyd on PostgreSQL, schema version 2: API keys, the table SQLite keeps beside its ledger
-- (src/store/sqlite/keys.rs), column for column. Only a SHA-256 digest of each key is stored,
-- never the key. A revoked key keeps its row and its name, which is never given to another key:
-- idempotency records are scoped by key name, so a new key under an old name could replay the
-- old key's answers.
--
-- Every instance on the database re-reads this table a few times a second (revocation takes
-- effect without a restart) and writes last_used_at_ms back coarsely, never moving it backwards
-- (GREATEST), so instances that use one key at once agree on its latest use.

CREATE TABLE api_keys (
    name            text   NOT NULL PRIMARY KEY,
    scope           text   NOT NULL CHECK (scope IN ('read', 'write', 'admin')),
    key_sha256      bytea  NOT NULL UNIQUE CHECK (octet_length(key_sha256) = 32),
    key_prefix      text   NOT NULL,
    client_cert_cn  text,
    created_at_ms   bigint NOT NULL,
    last_used_at_ms bigint,
    revoked_at_ms   bigint
);
