"""Index builder: checkpoint + item table → a verified, atomically published bundle
(docs/design.md#the-bundle-and-its-manifest).

encode.py (item vectors, numpy user encoder), recall.py (weighted ANN-vs-exact recall check),
snapshot.py (user features + history), publish.py (staging folder, fsync, rename), build.py (the
pipeline; the index itself is a csmf.index backend: FAISS or Milvus), cli.py (`csmf build-index`,
`csmf inspect`).
"""
