"""The one-command demo: `python -m demo` (or `make demo`) runs the whole pipeline on data shipped in
demo/data: tokenizer and shards, DeepSpeed pretraining on 2 CPU processes, the release, fine-tuning
on an SST-2 sample, and a results table with plots. `python -m demo --help` lists the options."""
