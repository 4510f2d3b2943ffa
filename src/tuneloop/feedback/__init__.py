"""The request log / feedback store (store.py) and its HTTP service (service.py): the ground floor
next to the registry; serving writes to it, ingest and monitoring read it."""
