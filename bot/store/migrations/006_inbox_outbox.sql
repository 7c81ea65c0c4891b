-- Durable inbox and outbox (no message lost, no chat blocking another).
--
-- inbox: every Telegram update is stored here (committed) before Telegram is told it was
-- received (the next getUpdates offset, or the webhook's 200). Handling is idempotent per
-- update; a restart finishes what is still pending. The payload is blanked once handled
-- (the interaction keeps what the bot needs); the row stays a while so that a redelivered
-- update is recognised. claimed_by/claimed_until: a lease, so that with several replicas one
-- handles each update.
CREATE TABLE inbox (
    update_id     INTEGER PRIMARY KEY,
    received_at   REAL NOT NULL,
    -- Who sent it (for /forget: an update of a forgotten user is blanked too); NULL if none.
    user_id       INTEGER,
    payload       TEXT NOT NULL,
    state         TEXT NOT NULL DEFAULT 'pending'
                  CHECK (state IN ('pending', 'done', 'poison')),
    claimed_by    TEXT,
    claimed_until REAL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    done_at       REAL,
    error         TEXT
);
CREATE INDEX inbox_state ON inbox (state, update_id);
CREATE INDEX inbox_user ON inbox (user_id);

-- outbox: what the bot must send, written in the same transaction as what it answers (a
-- verdict with its interaction, a reply with the reply text). A sender outside the update
-- handlers delivers it under Telegram's limits, per chat, retrying what may succeed later.
CREATE TABLE outbox (
    id              INTEGER PRIMARY KEY,
    created_at      REAL NOT NULL,
    chat_id         INTEGER NOT NULL,
    -- private: 1 message a second; group/supergroup/channel: 20 a minute.
    chat_type       TEXT NOT NULL,
    interaction_id  INTEGER REFERENCES interactions (id) ON DELETE CASCADE,
    -- verdict | reply | notice: verdict and reply messages are remembered in bot_messages.
    kind            TEXT NOT NULL CHECK (kind IN ('verdict', 'reply', 'notice')),
    -- Bot API parameters of sendMessage (text, reply_markup, reply_parameters).
    payload         TEXT NOT NULL,
    state           TEXT NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'sent', 'failed', 'dropped')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    not_before      REAL NOT NULL DEFAULT 0,
    sent_at         REAL,
    sent_message_id INTEGER,
    error           TEXT
);
CREATE INDEX outbox_pending ON outbox (state, chat_id, id);
CREATE INDEX outbox_interaction ON outbox (interaction_id);

-- /forget is final: a user's votes and reactions sent before the /forget (by Telegram's update
-- order) are refused when they arrive after it; later ones are new data.
CREATE TABLE forgotten_users (
    user_id          INTEGER PRIMARY KEY,
    forgotten_at     REAL NOT NULL,
    before_update_id INTEGER NOT NULL
);
