"""Which GGUF files to serve: catalog (names and files), fetch (into the cache, verified),
spec (--model specs to files), gguf (the header reader), errors (ModelError)."""
