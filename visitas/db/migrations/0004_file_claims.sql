-- Claims: a file at the source is processed by the one host that claims it.  A claim lasts until
-- lease_until; its host renews it while it works on the file and deletes it when done.  A host
-- that dies leaves a claim that expires, and the next run of any host takes the file over.
CREATE TABLE IF NOT EXISTS file_claims (
    file_name   text PRIMARY KEY,
    host        text        NOT NULL,
    run_id      text        NOT NULL,
    claimed_at  timestamptz NOT NULL DEFAULT now(),
    lease_until timestamptz NOT NULL
);
