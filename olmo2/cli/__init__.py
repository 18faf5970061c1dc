"""The command-line shells: each parses its arguments, builds what the library
needs, runs it, and turns expected errors into one line on stderr (exit 2).

``olmo2-train`` (:mod:`olmo2.cli.train`), ``olmo2-generate``
(:mod:`olmo2.cli.generate`), ``olmo2-tokenize`` (:mod:`olmo2.cli.tokenize`),
``olmo2-soup`` (:mod:`olmo2.cli.soup`), ``olmo2-eval`` (:mod:`olmo2.cli.eval`),
``olmo2-plot`` (:mod:`olmo2.cli.plot`), ``olmo2-rl`` (:mod:`olmo2.cli.rl`); each also runs as
``python -m olmo2.cli.<name>``.
"""
