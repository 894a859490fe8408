"""What a run stands on: the device mesh and sharding rules (`parallel`), several processes (`distributed`),
checkpoints (`checkpoint`) and what storage failures mean (`storage_errors`), records and logs (`metrics`)."""
