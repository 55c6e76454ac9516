"""Configuration classes: their parameters, listed once per class."""

import luigi
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
