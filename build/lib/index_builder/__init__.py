"""Index builder: checkpoint + item table → a verified, atomically published bundle (DESIGN §4).

encode.py (item vectors, numpy user encoder), faiss_index.py (Flat/HNSW/IVF), recall.py (weighted
ANN-vs-exact recall check), snapshot.py (user features + history), publish.py (staging folder,
fsync, rename), build.py (the pipeline), cli.py (`csmf build-index`, `csmf inspect`).
"""
