-- Calculated metrics per statistics row, engagement counters per visitor, and the loaded rows
-- opened and clicked per file (the open and click rates of the run mail and the report).

ALTER TABLE statistics
    ADD COLUMN IF NOT EXISTS abierto boolean,
    ADD COLUMN IF NOT EXISTS clicado boolean,
    ADD COLUMN IF NOT EXISTS minutos_a_open bigint,
    ADD COLUMN IF NOT EXISTS minutos_a_click bigint,
    ADD COLUMN IF NOT EXISTS opens_totales bigint,
    ADD COLUMN IF NOT EXISTS clicks_totales bigint,
    ADD COLUMN IF NOT EXISTS num_links bigint;

-- Visitors loaded before this migration have null engagement counters: unknown, not zero (the
-- statistics they came from are gone).  Merges keep them null; `visitas rebuild --apply`
-- recomputes them from the backups.  Every visitor inserted from now on has all of them.
ALTER TABLE visitor
    ADD COLUMN IF NOT EXISTS opens_totales bigint,
    ADD COLUMN IF NOT EXISTS clicks_totales bigint,
    ADD COLUMN IF NOT EXISTS visitas_abiertas bigint,
    ADD COLUMN IF NOT EXISTS visitas_clicadas bigint,
    ADD COLUMN IF NOT EXISTS fecha_ultimo_open date,
    ADD COLUMN IF NOT EXISTS fecha_ultimo_click date;

ALTER TABLE load_log
    ADD COLUMN IF NOT EXISTS rows_opened bigint,
    ADD COLUMN IF NOT EXISTS rows_clicked bigint;

-- Open and click rates: visits opened (clicked) divided by visits; null while unknown.
CREATE OR REPLACE VIEW visitor_engagement AS
SELECT email, visitas_totales, visitas_abiertas, visitas_clicadas,
       round(visitas_abiertas::numeric / visitas_totales, 4) AS tasa_apertura,
       round(visitas_clicadas::numeric / visitas_totales, 4) AS tasa_click,
       opens_totales, clicks_totales, fecha_ultimo_open, fecha_ultimo_click
FROM visitor;
