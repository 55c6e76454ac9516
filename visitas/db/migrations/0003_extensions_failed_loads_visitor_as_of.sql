-- Extensions (a completed stalled upload loads only the lines its first part did not finish),
-- failed loads recorded in load_log, and the visitor counters as of any day.

ALTER TABLE load_log ADD COLUMN IF NOT EXISTS extends bigint REFERENCES load_log (id);
ALTER TABLE load_log ADD COLUMN IF NOT EXISTS lines_done bigint;
ALTER TABLE load_log ADD COLUMN IF NOT EXISTS head_sha256 text;
ALTER TABLE load_log DROP CONSTRAINT IF EXISTS load_log_status_check;
ALTER TABLE load_log ADD CONSTRAINT load_log_status_check
    CHECK (status IN ('loaded', 'rejected', 'duplicate', 'failed'));
CREATE INDEX IF NOT EXISTS load_log_prefix ON load_log (head_sha256, size_bytes)
    WHERE status = 'loaded';

-- A database stamped version 2 by a release that never altered tables may still have it.
ALTER TABLE statistics DROP COLUMN IF EXISTS id;

-- The counters relative to a day instead of the latest visit.  Exact from the visitor row
-- alone for any day on or after the latest visit: every visit in that day's year (month) is
-- then in the year (month) of the latest visit, if that is the day's.
CREATE OR REPLACE FUNCTION visitor_as_of(day date)
RETURNS TABLE (email text, fecha_primera_visita date, fecha_ultima_visita date,
               visitas_totales bigint, visitas_anio_actual bigint, visitas_mes_actual bigint)
LANGUAGE sql STABLE SET search_path FROM CURRENT AS $$
SELECT v.email, v.fecha_primera_visita, v.fecha_ultima_visita, v.visitas_totales,
       CASE WHEN date_trunc('year', v.fecha_ultima_visita) = date_trunc('year', day)
            THEN v.visitas_anio_actual ELSE 0 END,
       CASE WHEN date_trunc('month', v.fecha_ultima_visita) = date_trunc('month', day)
            THEN v.visitas_mes_actual ELSE 0 END
FROM visitor AS v
$$;
CREATE OR REPLACE VIEW visitor_today AS
SELECT * FROM visitor_as_of(current_date);
