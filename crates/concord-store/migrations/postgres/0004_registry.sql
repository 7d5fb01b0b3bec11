-- The mesh registry: one row per registered entity (its registration as JSON), with its last
-- heartbeat and reported health.
CREATE TABLE registry (
    id TEXT PRIMARY KEY,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    body TEXT NOT NULL,
    health TEXT NOT NULL,
    registered_at_ms BIGINT NOT NULL,
    last_heartbeat_ms BIGINT NOT NULL
);
