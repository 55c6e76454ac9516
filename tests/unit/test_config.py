"""Configuration classes: their parameters, listed once per class; a section resolved again only
when what it reads changes."""

import luigi
from luigi.cmdline_parser import CmdlineParser
import pytest

from visitas import config, tasks


def _luigis_listing(cls) -> list:
    return luigi.Task.get_params.__func__(cls)


def test_each_class_lists_luigis_parameters_and_only_its_own():
    for cls in (config.paths, config.cluster, tasks.ArchiveZip, tasks.PrepareRun, tasks.RunAll):
        assert list(cls.get_params()) == _luigis_listing(cls)
        assert cls.get_params() is cls.get_params()  # listed once

    class WithMore(tasks.PrepareRun):
        extra = luigi.IntParameter(default=1)

    tasks.PrepareRun.get_params()  # the parent's listing is made before the subclass asks
    assert [name for name, _ in WithMore.get_params()] == ["date", "host", "extra"]
    assert list(WithMore.get_params()) == _luigis_listing(WithMore)


def test_files_per_zip_is_taken_within_its_range_and_refused_outside(luigi_config):
    assert config.paths().files_per_zip == 100
    luigi_config.set("paths", "files_per_zip", "65535")
    assert config.paths().files_per_zip == 65535
    for wrong in ("0", "65536", "many"):
        luigi_config.set("paths", "files_per_zip", wrong)
        with pytest.raises(ValueError, match="files_per_zip"):
            config.paths()


def test_a_section_is_resolved_again_only_when_what_it_reads_changes(luigi_config, monkeypatch):
    luigi_config.set("load", "batch_mb", "4")
    first = config.load()
    assert first.batch_mb == 4
    assert config.load() is first  # unchanged configuration: the same object, not resolved again

    luigi_config.set("load", "batch_mb", "6")
    assert config.load().batch_mb == 6

    monkeypatch.setenv("VISITAS_TEST_BATCH", "9")
    luigi_config.set("load", "batch_mb", "${VISITAS_TEST_BATCH}")
    assert config.load().batch_mb == 9
    monkeypatch.setenv("VISITAS_TEST_BATCH", "11")  # the same text, another value behind it
    assert config.load().batch_mb == 11

    luigi_config.remove_section("load")
    assert config.load().batch_mb == 8  # the default again


def test_a_section_follows_the_command_line_luigi_runs(luigi_config):
    luigi_config.set("load", "batch_mb", "4")
    assert config.load().batch_mb == 4
    with CmdlineParser.global_instance(["--load-batch-mb", "12", "PrepareRun"]):
        assert config.load().batch_mb == 12
    assert config.load().batch_mb == 4


def test_under_luigis_toml_parser_a_section_is_resolved_each_time(monkeypatch):
    toml = luigi.configuration.LuigiTomlParser()
    toml.data = {"load": {"batch_mb": 5}}
    monkeypatch.setattr(luigi.configuration, "get_config", lambda parser=None: toml)
    assert config.load().batch_mb == 5
    toml.data = {"load": {"batch_mb": 7}}  # no raw text tells this change: resolved again
    assert config.load().batch_mb == 7
