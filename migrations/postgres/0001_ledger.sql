-- tallyd on PostgreSQL, schema version 1: the data model of the SQLite store's version 4
-- (src/store/sqlite/schema.sql and holds.sql), less what exists only because SQLite has one
-- writer that keeps balances in memory (the balance checkpoint, the archive table). Here an
-- account's row is always current: every batch updates it in the transaction that moves it,
-- under its row lock.
--
-- Applied by tallyd in one transaction under an advisory lock (src/store/postgres/migrate.rs),
-- and recorded in tallyd_migrations.

CREATE TABLE ledger_accounts (
    name                text    NOT NULL PRIMARY KEY
                        CHECK (name = '@world' OR name ~ '^[0-9]{6,19}$'),
    opening_balance     bigint  NOT NULL CHECK (opening_balance >= 0 OR name = '@world'),
    -- May be negative down to the account's overdraft limit (account_credit); tallyd decides it
    -- and `tallyd verify` checks it.
    balance             bigint  NOT NULL,
    last_transaction_id bigint,
    created_at_ms       bigint  NOT NULL
);

INSERT INTO ledger_accounts (name, opening_balance, balance, created_at_ms)
VALUES ('@world', 0, 0, (extract(epoch FROM clock_timestamp()) * 1000)::bigint);

CREATE TABLE transactions (
    id                        bigint NOT NULL PRIMARY KEY,
    kind                      text   NOT NULL
                              CHECK (kind IN ('deposit', 'withdrawal', 'transfer', 'adjustment')),
    amount                    bigint NOT NULL CHECK (amount > 0 AND amount <= 1000000000000),
    source                    text   NOT NULL,
    source_amount             bigint NOT NULL,
    source_balance_after      bigint NOT NULL,
    source_previous_id        bigint,
    destination               text   NOT NULL CHECK (destination <> source),
    destination_amount        bigint NOT NULL,
    destination_balance_after bigint NOT NULL,
    destination_previous_id   bigint,
    reference                 text   CHECK (reference IS NULL OR octet_length(reference) <= 255),
    idempotency_key           text,
    created_at_ms             bigint NOT NULL,
    CHECK (source_amount + destination_amount = 0)
);

-- A statement walks one account's history newest first; so does a balance as of a moment.
CREATE INDEX transactions_by_source ON transactions (source, id);
CREATE INDEX transactions_by_destination ON transactions (destination, id);

CREATE FUNCTION tallyd_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% are permanent and immutable', TG_TABLE_NAME;
END
$$;

CREATE TRIGGER transactions_are_immutable BEFORE UPDATE OR DELETE ON transactions
FOR EACH ROW EXECUTE FUNCTION tallyd_immutable();

-- The (scope, key) pair is unique: two instances that receive the same key at once cannot both
-- insert it. The second one's INSERT waits for the first one's transaction and fails when it
-- commits; its batch is then decided again and finds the first one's answer.
CREATE TABLE idempotency_keys (
    id              bigint  NOT NULL PRIMARY KEY,
    scope           text    NOT NULL,
    idempotency_key text    NOT NULL,
    fingerprint     text    NOT NULL,
    status          integer NOT NULL,
    body            bytea   NOT NULL,
    transaction_id  bigint,
    created_at_ms   bigint  NOT NULL,
    UNIQUE (scope, idempotency_key)
);

CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at_ms, id);

CREATE TABLE account_credit (
    name            text   NOT NULL PRIMARY KEY,
    overdraft_limit bigint NOT NULL CHECK (overdraft_limit BETWEEN 0 AND 1000000000000),
    held            bigint NOT NULL CHECK (held >= 0)
);

CREATE TABLE holds (
    id              bigint NOT NULL PRIMARY KEY,
    card_number     text   NOT NULL,
    destination     text   CHECK (destination IS NULL OR destination <> card_number),
    amount          bigint NOT NULL CHECK (amount > 0 AND amount <= 1000000000000),
    status          text   NOT NULL CHECK (status IN ('pending', 'captured', 'voided', 'expired')),
    captured_amount bigint CHECK (captured_amount IS NULL OR (captured_amount > 0 AND captured_amount <= amount)),
    transaction_id  bigint,
    reference       text   CHECK (reference IS NULL OR octet_length(reference) <= 255),
    created_at_ms   bigint NOT NULL,
    expires_at_ms   bigint NOT NULL,
    resolved_at_ms  bigint,
    CHECK ((status = 'captured') = (captured_amount IS NOT NULL AND transaction_id IS NOT NULL)),
    CHECK ((status = 'pending') = (resolved_at_ms IS NULL))
);

CREATE INDEX holds_by_card ON holds (card_number, id);
-- The sweeper's: the pending holds by expiry.
CREATE INDEX holds_pending_by_expiry ON holds (expires_at_ms, id) WHERE status = 'pending';

CREATE FUNCTION tallyd_hold_resolves_once() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'holds are permanent';
    END IF;
    IF OLD.status <> 'pending' THEN
        RAISE EXCEPTION 'a hold is resolved once';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER holds_resolve_once BEFORE UPDATE OR DELETE ON holds
FOR EACH ROW EXECUTE FUNCTION tallyd_hold_resolves_once();

-- The next ids, handed out in blocks (src/store/postgres/ids.rs): a batch takes a block of
-- contiguous ids after it has locked its accounts, so that ids and times increase along every
-- account's history, as they do on SQLite.
CREATE TABLE tallyd_ids (
    id                  integer NOT NULL PRIMARY KEY CHECK (id = 1),
    next_transaction_id bigint  NOT NULL,
    next_key_id         bigint  NOT NULL,
    next_hold_id        bigint  NOT NULL
);

INSERT INTO tallyd_ids VALUES (1, 1, 1, 1);

CREATE VIEW entries AS
SELECT source AS account, id AS transaction_id, source_amount AS amount,
       source_balance_after AS balance_after, source_previous_id AS previous_id, created_at_ms
FROM transactions
UNION ALL
SELECT destination, id, destination_amount, destination_balance_after, destination_previous_id, created_at_ms
FROM transactions;

CREATE VIEW accounts AS
SELECT name AS card_number, opening_balance, balance, created_at_ms
FROM ledger_accounts
WHERE name <> '@world';

-- Every card's legs, as the SQLite store's view of the same name shows them.
CREATE VIEW journal AS
SELECT t.id, t.source AS card_number, t.source_amount AS amount, t.source_balance_after AS balance_after,
       t.created_at_ms
FROM transactions t WHERE t.source <> '@world'
UNION ALL
SELECT t.id, t.destination, t.destination_amount, t.destination_balance_after, t.created_at_ms
FROM transactions t WHERE t.destination <> '@world';
