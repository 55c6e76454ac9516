"""The transforms, pure Polars over files: the report contract (:mod:`.contract`), reading a file
(:mod:`.reading`), validating it (:mod:`.validate`), splitting it into errors and visitor
summaries (:mod:`.split`), and the visitor rule (:mod:`.visitors`)."""
