-- One row, rewritten and committed by every health probe (/healthz): the probe takes the same
-- path as a vote (BEGIN IMMEDIATE, a write, an fsync'd COMMIT), so a database that refuses
-- writes (read-only, full, failing disk) fails the probe instead of answering "ok".
-- Portable SQL: the upsert is spelled the same in PostgreSQL.
CREATE TABLE health_probe (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    at REAL NOT NULL
);
