"""Process-wide concerns: the run's identity, logging with secrets masked, bounded retries, and
the one initialisation that sets them up (:func:`visitas.runtime.setup.configure`)."""
