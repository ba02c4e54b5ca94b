"""Dataset adapters (MovieLens-100K, synthetic cascade) and the dataset folder format
(docs/design.md#data-formats)."""
