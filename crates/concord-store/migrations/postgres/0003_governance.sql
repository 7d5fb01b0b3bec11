-- API keys (only a hash of the secret is kept) and the hash-chained audit log.
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    principal TEXT NOT NULL,
    roles TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    revoked_at_ms BIGINT
);

CREATE TABLE audit_log (
    seq BIGINT PRIMARY KEY,
    at_ms BIGINT NOT NULL,
    kind TEXT NOT NULL,
    principal TEXT NOT NULL,
    data TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
