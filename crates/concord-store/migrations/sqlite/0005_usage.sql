-- The LLM usage ledger: one row per provider attempt of an agent run (failed ones included).
CREATE TABLE llm_usage (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    run_id TEXT NOT NULL,
    parent_run TEXT,
    agent TEXT NOT NULL,
    principal TEXT NOT NULL,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cost_usd REAL NOT NULL,
    latency_ms INTEGER NOT NULL,
    error TEXT
);
CREATE INDEX llm_usage_at ON llm_usage (at_ms);
