"""Development only — never imported by production code, never shipped by ``pip install .``:
throwaway servers (:mod:`.servers`), sample reports (:mod:`.sample`), ``make demo``
(:mod:`.demo`) and ``make bench`` (:mod:`.bench`)."""
