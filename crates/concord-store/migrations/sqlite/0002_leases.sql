-- Leases with fencing tokens: a row per key ever claimed; the token only grows.
CREATE TABLE state_leases (
    ns TEXT NOT NULL,
    key TEXT NOT NULL,
    token INTEGER NOT NULL,
    holder TEXT NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    PRIMARY KEY (ns, key)
);
