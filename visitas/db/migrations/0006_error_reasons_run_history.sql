-- Error rows by reason per file (errors itself is emptied every run date), and one row per
-- `visitas run`: the last successful run, silences, and the metrics file read it.

ALTER TABLE load_log ADD COLUMN IF NOT EXISTS error_reasons jsonb NOT NULL DEFAULT '{}';

CREATE TABLE IF NOT EXISTS run_history (
    run_id          text PRIMARY KEY,
    host            text        NOT NULL,
    run_date        date        NOT NULL,
    started_at      timestamptz NOT NULL,
    finished_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    exit_code       integer     NOT NULL,
    outcome         text        NOT NULL,
    files_loaded    bigint      NOT NULL DEFAULT 0,
    files_rejected  bigint      NOT NULL DEFAULT 0,
    files_duplicate bigint      NOT NULL DEFAULT 0,
    files_failed    bigint      NOT NULL DEFAULT 0,
    rows_loaded     bigint      NOT NULL DEFAULT 0,
    rows_rejected   bigint      NOT NULL DEFAULT 0,
    silent          boolean     NOT NULL DEFAULT false,
    last_file_at    timestamptz
);
CREATE INDEX IF NOT EXISTS run_history_finished ON run_history (finished_at);
