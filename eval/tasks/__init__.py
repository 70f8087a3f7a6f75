"""Offline lm-eval task configs (YAML) and their dataset loaders (utils.py).

The folder is an lm-eval include path; utils.py imports nothing from ablate, so the YAMLs also
work with plain `lm_eval --include_path eval/tasks --metadata '{"data_dir": "..."}'`.
"""
