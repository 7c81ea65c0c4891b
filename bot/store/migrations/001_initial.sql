-- loopbot schema, version 1.
-- Times are Unix seconds (UTC) as REAL: sortable, timezone-free, cheap to bucket by hour.

-- Which prompt version serves whom. A version without a row has never been served.
CREATE TABLE prompt_versions (
    id           TEXT PRIMARY KEY,
    state        TEXT NOT NULL CHECK (state IN ('active', 'candidate', 'retired')),
    -- Candidates only: fraction of the bucket space, starting at range_start.
    share        REAL NOT NULL DEFAULT 0 CHECK (share >= 0 AND share <= 1),
    range_start  INTEGER NOT NULL DEFAULT 0 CHECK (range_start >= 0 AND range_start < 10000),
    -- Hash of the YAML when the current state (or test) began: an edit restarts the test.
    content_hash TEXT NOT NULL DEFAULT '',
    state_since  REAL NOT NULL,
    -- The active version this one replaced when it was last promoted: the rollback target.
    replaced     TEXT,
    CHECK (state = 'candidate' OR share = 0)
);
-- Exactly one active version at a time is a database invariant, not a convention.
CREATE UNIQUE INDEX prompt_versions_one_active ON prompt_versions (state) WHERE state = 'active';

-- Append-only history of every state change, written in the same transaction as the change.
CREATE TABLE audit_log (
    id              INTEGER PRIMARY KEY,
    at              REAL NOT NULL,
    actor           TEXT NOT NULL,
    action          TEXT NOT NULL,
    version_id      TEXT NOT NULL,
    from_state      TEXT,
    to_state        TEXT NOT NULL,
    share           REAL NOT NULL DEFAULT 0,
    previous_active TEXT,
    reason          TEXT NOT NULL DEFAULT '',
    stats           TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_version ON audit_log (version_id, at);
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'audit_log is append-only');
END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'audit_log is append-only');
END;

-- One user message and what the bot made of it.
CREATE TABLE interactions (
    id                 INTEGER PRIMARY KEY,
    created_at         REAL NOT NULL,
    update_id          INTEGER,
    chat_id            INTEGER NOT NULL,
    chat_type          TEXT NOT NULL DEFAULT 'private',
    user_id            INTEGER NOT NULL,
    message_id         INTEGER NOT NULL,
    -- NULL once erased by retention or /forget; the verdict and its votes stay.
    text               TEXT,
    version_id         TEXT NOT NULL,
    content_hash       TEXT NOT NULL DEFAULT '',
    arm                TEXT NOT NULL CHECK (arm IN ('active', 'candidate')),
    bucket             INTEGER NOT NULL,
    -- NULL when the chat only gets replies (no verdict was computed).
    label              TEXT,
    probabilities      TEXT NOT NULL DEFAULT '{}',
    confidence         REAL,
    verdict_latency_ms REAL,
    verdict_message_id INTEGER,
    reply_text         TEXT,
    reply_latency_ms   REAL,
    text_erased_at     REAL,
    -- A redelivered Telegram update must not create a second interaction.
    UNIQUE (chat_id, message_id)
);
CREATE INDEX interactions_user ON interactions (user_id);
CREATE INDEX interactions_version_time ON interactions (version_id, created_at);
CREATE INDEX interactions_chat ON interactions (chat_id, id);
CREATE INDEX interactions_time ON interactions (created_at);

-- Bot messages that belong to an interaction, so a reaction can be traced back to it.
CREATE TABLE bot_messages (
    chat_id        INTEGER NOT NULL,
    message_id     INTEGER NOT NULL,
    interaction_id INTEGER NOT NULL REFERENCES interactions (id) ON DELETE CASCADE,
    kind           TEXT NOT NULL CHECK (kind IN ('verdict', 'reply')),
    PRIMARY KEY (chat_id, message_id)
);
CREATE INDEX bot_messages_interaction ON bot_messages (interaction_id);

-- Feedback on a verdict: one row per user and interaction, updated when the user changes it.
CREATE TABLE votes (
    id             INTEGER PRIMARY KEY,
    interaction_id INTEGER NOT NULL REFERENCES interactions (id) ON DELETE CASCADE,
    user_id        INTEGER NOT NULL,
    correct        INTEGER NOT NULL CHECK (correct IN (0, 1)),
    -- Set when a "wrong" vote names the right label.
    correct_label  TEXT,
    created_at     REAL NOT NULL,
    updated_at     REAL NOT NULL,
    changes        INTEGER NOT NULL DEFAULT 0,
    UNIQUE (interaction_id, user_id)
);
CREATE INDEX votes_user ON votes (user_id);
CREATE INDEX votes_time ON votes (updated_at);

-- Emoji reactions on the bot's messages: the current set per user and message.
CREATE TABLE reactions (
    id             INTEGER PRIMARY KEY,
    interaction_id INTEGER NOT NULL REFERENCES interactions (id) ON DELETE CASCADE,
    chat_id        INTEGER NOT NULL,
    message_id     INTEGER NOT NULL,
    user_id        INTEGER NOT NULL,
    kind           TEXT NOT NULL CHECK (kind IN ('verdict', 'reply')),
    emojis         TEXT NOT NULL,
    polarity       INTEGER NOT NULL CHECK (polarity IN (-1, 0, 1)),
    updated_at     REAL NOT NULL,
    UNIQUE (chat_id, message_id, user_id)
);
CREATE INDEX reactions_interaction ON reactions (interaction_id);
CREATE INDEX reactions_user ON reactions (user_id);
