"""The daemon: events decoded from Kafka, the consume loop, the learner between one read and one
atomic apply, the WALS refresh, metrics, and the wiring of `streammf run`."""
