"""Helpers every stage shares (data_pipeline, pretrain, finetune, slurm, demo, bench), one copy each:
atomic writes (`files`), a free TCP port (`net`), AdamW parameter groups and the learning-rate schedule
(`optim`), and the typed-config machinery (`config`). `hypermixer/` (the model library) does not import
it: a release's generated code must stay torch + safetensors only."""
