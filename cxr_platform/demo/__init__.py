"""What ``cxr demo`` drives beyond the main job: the monitoring loop through Dagster's sensors,
and the traffic client that sends in-distribution or shifted images to the live service (also
``cxr simulate-drift``). Above ``defs/`` and beside the CLI: it drives Dagster, it defines
nothing in it."""
