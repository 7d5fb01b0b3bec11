-- The LLM usage ledger: one row per provider attempt of an agent run (failed ones included).
CREATE TABLE llm_usage (
    seq BIGSERIAL PRIMARY KEY,
    at_ms BIGINT NOT NULL,
    run_id TEXT NOT NULL,
    parent_run TEXT,
    agent TEXT NOT NULL,
    principal TEXT NOT NULL,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    input_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    cost_usd DOUBLE PRECISION NOT NULL,
    latency_ms BIGINT NOT NULL,
    error TEXT
);
CREATE INDEX llm_usage_at ON llm_usage (at_ms);
