-- Registered names have owners: each row records the principal that registered it, and
-- `registry_names` holds each (namespace, name)'s claim, which outlives its last row for a grace
-- period (a redeploy does not free the name). Rows of before this migration have the owner ''
-- (registered before names had owners): the first principal to register or heartbeat one of
-- them adopts its name. `ttl_ms` lets expired rows be pruned without reading their bodies;
-- `etag` (a hash of the body) lets a reader fetch only the bodies that changed.
ALTER TABLE registry
    ADD COLUMN owner TEXT NOT NULL DEFAULT '',
    ADD COLUMN ttl_ms BIGINT NOT NULL DEFAULT 30000,
    ADD COLUMN etag BIGINT NOT NULL DEFAULT 0;
-- Bodies are the node's own JSON serialization of a registration.
UPDATE registry
   SET ttl_ms = 1000 * COALESCE((body::jsonb ->> 'ttl_seconds')::bigint, 30)
 WHERE body LIKE '{%';
CREATE INDEX registry_by_owner ON registry (owner);
CREATE INDEX registry_by_name ON registry (namespace, name);
CREATE TABLE registry_names (
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    owner TEXT NOT NULL,
    claimed_at_ms BIGINT NOT NULL,
    touched_ms BIGINT NOT NULL,
    PRIMARY KEY (namespace, name)
);
CREATE INDEX registry_names_by_owner ON registry_names (owner);
