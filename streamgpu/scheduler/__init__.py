"""Per-model queues, batch formation, deadlines and admission, on the event loop."""
