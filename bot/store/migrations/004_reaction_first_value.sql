-- The first 👍/👎 a user gave a reply, and when. The decision engine files a reaction under the
-- hour it was first given, as it does votes (003): changing or removing it later changes what
-- /stats shows, not an hour the e-process has already closed. A removed reaction keeps its row
-- (no emojis, polarity 0) for that reason; /forget still deletes it.
ALTER TABLE reactions ADD COLUMN first_polarity INTEGER CHECK (first_polarity IN (-1, 0, 1));
ALTER TABLE reactions ADD COLUMN first_at REAL;
UPDATE reactions SET first_polarity = polarity, first_at = updated_at;
