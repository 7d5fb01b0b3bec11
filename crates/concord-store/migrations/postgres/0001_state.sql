-- Shared agent state: current values, every committed version, commits and proposals.
CREATE TABLE state_sequence (
    seq BIGINT NOT NULL
);
INSERT INTO state_sequence (seq) VALUES (0);

CREATE TABLE state_commits (
    seq BIGINT PRIMARY KEY,
    author TEXT NOT NULL,
    proposal_id TEXT,
    trace_id TEXT,
    committed_at_ms BIGINT NOT NULL,
    idempotency_key TEXT UNIQUE,
    result TEXT NOT NULL
);

CREATE TABLE state_keys (
    ns TEXT NOT NULL,
    key TEXT NOT NULL,
    version BIGINT NOT NULL,
    value TEXT NOT NULL,
    seq BIGINT NOT NULL REFERENCES state_commits (seq),
    PRIMARY KEY (ns, key)
);

CREATE TABLE state_history (
    ns TEXT NOT NULL,
    key TEXT NOT NULL,
    version BIGINT NOT NULL,
    value TEXT NOT NULL,
    seq BIGINT NOT NULL REFERENCES state_commits (seq),
    PRIMARY KEY (ns, key, version)
);
CREATE INDEX state_history_seq ON state_history (seq);

CREATE TABLE state_proposals (
    id TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    status TEXT NOT NULL,
    expires_at_ms BIGINT NOT NULL
);
