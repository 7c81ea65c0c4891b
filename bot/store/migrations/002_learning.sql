-- The learning loop: offline checks of candidate prompt versions, and the candidates
-- mined from corrected mistakes (proposed, refused, sent to canary).
CREATE TABLE offline_checks (
    id                INTEGER PRIMARY KEY,
    at                REAL NOT NULL,
    candidate_id      TEXT NOT NULL,
    active_id         TEXT NOT NULL,
    n                 INTEGER NOT NULL,
    candidate_correct INTEGER NOT NULL,
    active_correct    INTEGER NOT NULL,
    margin            REAL NOT NULL,
    passed            INTEGER NOT NULL CHECK (passed IN (0, 1)),
    reason            TEXT NOT NULL,
    details           TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX offline_checks_candidate ON offline_checks (candidate_id, at);
CREATE TABLE candidate_proposals (
    candidate_id     TEXT PRIMARY KEY,
    parent_id        TEXT NOT NULL,
    created_at       REAL NOT NULL,
    status           TEXT NOT NULL CHECK (status IN
                     ('refused', 'proposed', 'canary', 'expired', 'failed')),
    path             TEXT NOT NULL,
    reason           TEXT NOT NULL,
    judged           INTEGER NOT NULL DEFAULT 0,
    error_rate       REAL NOT NULL DEFAULT 0,
    offline_check_id INTEGER REFERENCES offline_checks (id),
    report           TEXT NOT NULL DEFAULT '{}',
    decided_by       TEXT,
    decided_at       REAL
);
CREATE INDEX candidate_proposals_status ON candidate_proposals (status);
