"""Storage formats shared by every stage: webdataset shards, parquet manifests, metrics JSON."""
