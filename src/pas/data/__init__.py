"""Image sources: the pool that `retrieve` searches, and safe image decoding."""
