-- Which scorer produced each verdict: "gguf:<file name>:<sha256 prefix>" for a model run in
-- process, "remote:<model id>" for an inference server. The same prompt can give different
-- probabilities on another model file or server, so the decision engine compares two arms
-- only when their verdicts were scored the same way. Rows from before this migration keep
-- NULL ("unrecorded"): to the engine they are one scorer of their own. NULL also when no
-- verdict was computed (a reply only).
-- Portable SQL: ADD COLUMN without a default is spelled the same in PostgreSQL.
ALTER TABLE interactions ADD COLUMN scorer TEXT;
