from bundle_fixtures import flat_bundle, tiny_dataset, tiny_run  # noqa: F401  (session fixtures)
