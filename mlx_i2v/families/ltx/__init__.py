"""The LTX-Video family (0.9.x): its variants and strategies (:mod:`.variants`), memory model
(:mod:`.planner`), schedules (:mod:`.schedules`) and loader (:mod:`.loading`)."""
