"""Operator tools: the ``visitas`` command (:mod:`.cli`), the monthly summary from the load log
(:mod:`.monthly`) and the run mail (:mod:`.runmail`)."""
