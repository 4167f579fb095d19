"""The model catalog: names, files, fetching and verifying them."""
