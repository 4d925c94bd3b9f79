"""The LTX-Video family (0.9.x): its loader. Its variants and strategies are in :mod:`mlx_i2v.ltx_family`,
its memory model in :mod:`mlx_i2v.ltx_planner`, its schedules in :mod:`mlx_i2v.ltx_schedules`."""
