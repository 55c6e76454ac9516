-- The schema as first released: statistics with a surrogate identity key.
CREATE TABLE IF NOT EXISTS load_log (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    file_name       text        NOT NULL,
    sha256          text        NOT NULL,
    size_bytes      bigint      NOT NULL,
    run_date        date        NOT NULL,
    run_id          text,
    host            text,
    status          text        NOT NULL CHECK (status IN ('loaded', 'rejected', 'duplicate')),
    duplicate_of    bigint REFERENCES load_log (id),
    rows_read       bigint      NOT NULL DEFAULT 0,
    rows_loaded     bigint      NOT NULL DEFAULT 0,
    rows_rejected   bigint      NOT NULL DEFAULT 0,
    error_count     bigint      NOT NULL DEFAULT 0,
    encoding        text,
    reason          text,
    message         text,
    warnings        jsonb       NOT NULL DEFAULT '{}',
    visitors        bigint      NOT NULL DEFAULT 0,
    backup_archive  text,
    started_at      timestamptz NOT NULL,
    finished_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    archived_at     timestamptz,
    source_removed_at timestamptz,
    CHECK (rows_read = rows_loaded + rows_rejected)
);
CREATE UNIQUE INDEX IF NOT EXISTS load_log_loaded_once ON load_log (sha256)
    WHERE status = 'loaded';
CREATE INDEX IF NOT EXISTS load_log_file ON load_log (file_name, sha256);
CREATE INDEX IF NOT EXISTS load_log_run_date ON load_log (run_date);
CREATE TABLE IF NOT EXISTS run_log (
    run_date    date PRIMARY KEY,
    prepared_at timestamptz NOT NULL DEFAULT now(),
    truncated   boolean     NOT NULL
);
CREATE TABLE IF NOT EXISTS statistics (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    email          text NOT NULL,
    jyv            text,
    badmail        text,
    baja           text,
    fecha_envio    timestamp NOT NULL,
    fecha_open     timestamp,
    fecha_click    timestamp,
    opens          bigint,
    opens_virales  bigint,
    clicks         bigint,
    clicks_virales bigint,
    links          text[],
    ips            text[],
    navegadores    text[],
    plataformas    text[],
    source_file    text   NOT NULL,
    line_no        bigint NOT NULL,
    load_id        bigint NOT NULL DEFAULT current_setting('visitas.load_id')::bigint
);
CREATE TABLE IF NOT EXISTS errors (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_file text   NOT NULL,
    line_no     bigint NOT NULL,
    column_name text   NOT NULL,
    reason      text   NOT NULL,
    message     text   NOT NULL,
    raw_line    text,
    load_id     bigint NOT NULL DEFAULT current_setting('visitas.load_id')::bigint,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS visitor (
    email                text PRIMARY KEY,
    fecha_primera_visita date   NOT NULL,
    fecha_ultima_visita  date   NOT NULL,
    visitas_totales      bigint NOT NULL,
    visitas_anio_actual  bigint NOT NULL,
    visitas_mes_actual   bigint NOT NULL,
    updated_at           timestamptz NOT NULL DEFAULT now()
);
-- The same counters relative to today's date.  Exact from the visitor row alone: every visit
-- in today's year (month) is in the year (month) of the latest visit, if that is today's.
CREATE OR REPLACE VIEW visitor_today AS
SELECT email, fecha_primera_visita, fecha_ultima_visita, visitas_totales,
       CASE WHEN date_trunc('year', fecha_ultima_visita) = date_trunc('year', current_date)
            THEN visitas_anio_actual ELSE 0 END AS visitas_anio_actual,
       CASE WHEN date_trunc('month', fecha_ultima_visita) = date_trunc('month', current_date)
            THEN visitas_mes_actual ELSE 0 END AS visitas_mes_actual
FROM visitor;
