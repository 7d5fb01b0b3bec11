-- Idempotency keys belong to the principal who committed with them and are bound to the
-- request they were first used for (a SHA-256 of its keys, operations and base versions): a
-- key of one principal never answers another's write, and a key reused for a different request
-- is refused instead of replaying an unrelated result. (`state_commits.idempotency_key` keeps
-- the global, unbound keys of commits made before this migration and of the store's own
-- callers that ask for them.)
CREATE TABLE state_idempotency (
    principal TEXT NOT NULL,
    key TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    seq INTEGER NOT NULL REFERENCES state_commits (seq),
    PRIMARY KEY (principal, key)
);
