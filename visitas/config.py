"""Configuration: one ``luigi.Config`` class per section of ``luigi.cfg``.

Secrets (passwords, DSN) come from ``${ENV}`` references in the cfg file or from environment
variables; their parameters are private so luigid never shows them.  The class names are the
section names, as Luigi requires.
"""

from __future__ import annotations

import os
import re
import socket

import luigi
import luigi.configuration
from luigi.cmdline_parser import CmdlineParser
from luigi.parameter import ParameterVisibility
from luigi.task_register import Register

from visitas.archive import ZIP_LEVELS
from visitas.transform import contract

PRIVATE = ParameterVisibility.PRIVATE


class FixedParams:
    """A Luigi task or config class whose parameters are listed once.

    Luigi lists a class's parameters with ``dir()`` each time one of its objects is made or
    shown (measured: 17 us a time, about 80 times per file of a run); they never change once
    the class is defined.
    """

    @classmethod
    def get_params(cls):
        listed = cls.__dict__.get("_params_listed")
        if listed is None:
            listed = tuple(super().get_params())
            cls._params_listed = listed  # this class's own: a subclass lists its own
        return listed


_ENV_REFERENCE = re.compile(r"\$\{([^}]*)\}")


class Section(Register):
    """The metaclass of the sections: ``section()`` resolves its parameters again only when what
    they are read from changed.

    Making a ``luigi.Config`` object resolves every parameter from the configuration each time
    (Luigi's own cache of objects is looked up after that): 40-250 us a section, read about twenty
    times per file of a run.  What a section's parameters depend on is the section's raw text in
    the configuration, the environment variables its ``${VAR}`` references name, and the command
    line Luigi is running; they are its fingerprint, about 5 us to take.  Changed configuration
    (a reload, a test's ``set``) gives a new fingerprint, so the section is resolved again.
    """

    def __call__(cls, *args, **kwargs):
        if args or kwargs:
            return super().__call__(*args, **kwargs)
        parser, name = luigi.configuration.get_config(), cls.get_task_family()
        if not isinstance(parser, luigi.configuration.LuigiConfigParser):
            return super().__call__()  # Luigi's TOML parser: no raw text to fingerprint
        raw = tuple(parser.items(name, raw=True)) if parser.has_section(name) else ()
        names = {var for _, value in raw for var in _ENV_REFERENCE.findall(value or "")}
        fingerprint = (raw, tuple(sorted((var, os.environ.get(var)) for var in names)),
                       CmdlineParser.get_instance())
        made = cls.__dict__.get("_made")
        if made is None or made[0] != fingerprint:
            made = (fingerprint, super().__call__())
            cls._made = made
        return made[1]


class sftp(FixedParams, luigi.Config, metaclass=Section):  # noqa: N801 - the cfg section is [sftp]
    host = luigi.Parameter(default="localhost")
    port = luigi.IntParameter(default=22)
    username = luigi.Parameter(default="")
    password = luigi.Parameter(default="", visibility=PRIVATE, significant=False)
    key_file = luigi.Parameter(default="", description="private key for key authentication")
    key_passphrase = luigi.Parameter(default="", visibility=PRIVATE, significant=False)
    known_hosts = luigi.Parameter(default="~/.ssh/known_hosts",
                                  description="host keys; an unknown or changed key is refused")
    remote_dir = luigi.Parameter(default="/home/vinkOS/archivosVisitas")
    pattern = luigi.Parameter(default="report_*.txt")
    timeout = luigi.FloatParameter(default=30.0, description="connect and channel timeout, seconds")
    min_age = luigi.FloatParameter(
        default=120.0, description="seconds since a file's last modification before it is taken")


class postgres(FixedParams, luigi.Config, metaclass=Section):  # noqa: N801
    dsn = luigi.Parameter(default="", visibility=PRIVATE, significant=False,
                          description="libpq DSN; empty means the VISITAS_DSN environment variable")
    schema = luigi.Parameter(default="public")
    lock_wait = luigi.FloatParameter(
        default=600.0, description="seconds to wait for a file locked by another worker or host")

    def resolved_dsn(self) -> str:
        return self.dsn or os.environ.get("VISITAS_DSN", "")


class paths(FixedParams, luigi.Config, metaclass=Section):  # noqa: N801
    download_dir = luigi.Parameter(default="/tmp/visitas")
    backup_dir = luigi.Parameter(default="/home/etl/visitas/bckp")
    state_dir = luigi.Parameter(default="", description="intermediate files and task markers;"
                                                        " default: download_dir + '-state'")
    keep_backups_days = luigi.IntParameter(
        default=0, description="delete backup zips of run dates older than this many days;"
                               " 0: keep all")
    keep_state_days = luigi.IntParameter(
        default=14, description="remove the download and state folders of run dates older than"
                                " this many days once nothing in them is needed; 0: keep all")
    metrics_file = luigi.Parameter(
        default="", description="Prometheus textfile written after each `visitas run`; empty: none")
    files_per_zip = luigi.NumericalParameter(
        var_type=int, min_value=1, max_value=65536, default=100,
        description="files per backup zip (1-65535); a day's next files go into a new one")

    def resolved_state_dir(self) -> str:
        return self.state_dir or self.download_dir.rstrip("/") + "-state"


class notify(FixedParams, luigi.Config, metaclass=Section):  # noqa: N801
    smtp_host = luigi.Parameter(default="")
    smtp_port = luigi.IntParameter(default=25)
    smtp_user = luigi.Parameter(default="")
    smtp_password = luigi.Parameter(default="", visibility=PRIVATE, significant=False)
    smtp_starttls = luigi.BoolParameter(default=False)
    sender = luigi.Parameter(default="visitas@localhost")
    recipients = luigi.Parameter(default="", description="comma-separated; empty: no mail")
    send_always = luigi.BoolParameter(default=False, description="mail after every run, not only on problems")
    max_attachment_rows = luigi.IntParameter(default=10000)
    stale_after_hours = luigi.FloatParameter(
        default=26.0, description="no file at the source and none received for longer than this:"
                                  " the run mail goes out and `visitas run` exits missing_data;"
                                  " 0: never")


class load(FixedParams, luigi.Config, metaclass=Section):  # noqa: N801
    truncate_each_run = luigi.BoolParameter(
        default=True, parsing=luigi.BoolParameter.EXPLICIT_PARSING,
        description="empty statistics and errors once per run date before loading")
    batch_mb = luigi.IntParameter(default=8, description="MiB of the file read per batch")
    parallel_batches = luigi.IntParameter(
        default=2, description="batches of a file validated at once, in threads")
    max_line_bytes = luigi.IntParameter(
        default=contract.MAX_LINE_BYTES, description="a longer line is rejected (line_too_long)")
    zip_level = luigi.ChoiceParameter(var_type=int, choices=list(ZIP_LEVELS), default=1,
                                      description="ISA-L deflate level of the backup zip (0-3)")


class retry(FixedParams, luigi.Config, metaclass=Section):  # noqa: N801
    attempts = luigi.IntParameter(default=5, description="tries of one SFTP or database operation")
    first_delay = luigi.FloatParameter(default=1.0, description="seconds before the 2nd try; doubles")
    max_delay = luigi.FloatParameter(default=30.0)


class logfile(FixedParams, luigi.Config, metaclass=Section):  # noqa: N801 - [log] would clash with Luigi's --log-level
    path = luigi.Parameter(default="logs/visitas.log", description="rotating log file; empty: none")
    level = luigi.Parameter(default="INFO")
    max_mb = luigi.IntParameter(default=20)
    backups = luigi.IntParameter(default=10)


class cluster(FixedParams, luigi.Config, metaclass=Section):  # noqa: N801
    """Several hosts sharing one luigid and one database (README: Past one machine)."""

    host = luigi.Parameter(default="", description="this host's name in task ids, claims and"
                                                   " load_log; empty: the machine's name")
    claim_lease = luigi.FloatParameter(
        default=900.0, description="seconds a host's claim on a file lasts unless it renews it")

    def resolved_host(self) -> str:
        return self.host or socket.gethostname()
