-- The value a vote had when it was cast. The decision engine files a vote under the hour it was
-- cast; if a later change rewrote that value, an hour the e-process had already closed would
-- change after the fact. Users may still change their vote (`correct` is what /stats shows).
ALTER TABLE votes ADD COLUMN first_correct INTEGER CHECK (first_correct IN (0, 1));
UPDATE votes SET first_correct = correct;
