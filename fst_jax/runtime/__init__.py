"""What a run stands on: the device mesh and sharding rules (`parallel`), several processes (`distributed`),
checkpoints (`checkpoint`) and what storage failures mean (`storage_errors`), one run per workdir
(`workdir_lock`), records and logs (`metrics`, `wandb_log`)."""
