"""The benchmark harness: ``csmf bench`` (:mod:`bench.harness.cli`), its keyed run cache
(:mod:`bench.harness.cache`), isolated runs (:mod:`bench.harness.run`) and the tables it renders."""
