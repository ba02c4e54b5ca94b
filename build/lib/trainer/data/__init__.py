"""Dataset adapters (MovieLens-100K, synthetic cascade) and the dataset folder format (DESIGN §3)."""
