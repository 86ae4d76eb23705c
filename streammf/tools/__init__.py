"""Offline helpers: the synthetic stream, the Kafka producer for replays, rating-log readers, and the
prequential evaluation."""
