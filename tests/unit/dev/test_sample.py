"""The generator's output through the contract gives exactly what it planted."""

import polars as pl

from visitas.dev import sample
from visitas.transform import split, validate


def test_generator_is_deterministic(tmp_path):
    a = sample.generate(tmp_path / "a", files=2, rows=200, seed=3, defects=0.1)
    b = sample.generate(tmp_path / "b", files=2, rows=200, seed=3, defects=0.1)
    assert a == b
    assert (tmp_path / "a" / "report_2.txt").read_bytes() == (tmp_path / "b" / "report_2.txt").read_bytes()


def test_every_planted_defect_is_reported_with_its_line(tmp_path):
    manifest = sample.generate(tmp_path / "in", files=3, rows=900, seed=11, defects=0.05)
    truth = pl.read_parquet(tmp_path / "in" / "truth.parquet")
    for name, info in manifest["files"].items():
        checked, split_dir = tmp_path / name / "checked", tmp_path / name / "split"
        verdict = validate.validate_report(tmp_path / "in" / name, name, checked)
        split.split_report(checked, name, split_dir)
        assert verdict.encoding == info["encoding"]
        assert (verdict.rows_read, verdict.rows_loaded, verdict.rows_rejected) == (
            info["rows"], info["valid_rows"], info["rejected_rows"])
        error_lines = {int(line.split("\t")[1])
                       for line in (split_dir / "errors.copy").read_text().splitlines()}
        planted = {n for lines in info["defects"].values() for n in lines}
        assert error_lines == planted
        assert all(info["defects"][kind] for kind in sample.DEFECT_KINDS)
        stats_lines = pl.concat(split.statistics_batches(checked, name))["line_no"].to_list()
        assert stats_lines == truth.filter(pl.col("source_file") == name)["line_no"].to_list()


def test_quirks_are_present(tmp_path):
    sample.generate(tmp_path, files=3, rows=300, seed=5)
    first = (tmp_path / "report_1.txt").read_bytes()
    assert b"\r\n" in first and b'"65.49.14.' in first and b",-," in first
    assert (tmp_path / "report_3.txt").read_bytes().startswith(b"\xef\xbb\xbf")
    assert b"\r\n" not in (tmp_path / "report_3.txt").read_bytes()
    assert "Explorador móvil".encode("cp1252") in (tmp_path / "report_2.txt").read_bytes()
    truth = pl.read_parquet(tmp_path / "truth.parquet")
    assert truth["sent_at"].dt.year().n_unique() >= 2
    assert truth.group_by("email").agg(pl.col("source_file").n_unique()).filter(
        pl.col("source_file") > 1).height > 0
