"""The `ovsam-batch` command line: a thin layer over `ovsam`, `pipelines` and `jobs`."""
