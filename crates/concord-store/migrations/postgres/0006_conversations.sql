-- Agents' conversations: each turn's new messages, appended, so concurrent turns of one
-- conversation interleave and neither is lost.
CREATE TABLE agent_turns (
    seq BIGSERIAL PRIMARY KEY,
    conversation_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    agent TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    messages TEXT NOT NULL
);
CREATE INDEX agent_turns_conversation ON agent_turns (conversation_id, seq);
CREATE INDEX agent_turns_at ON agent_turns (at_ms);
