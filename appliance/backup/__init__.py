"""Backup and restore of a node: one encrypted file with the database, secrets, audit files, vector store and
configuration (``appliance backup`` / ``appliance restore``)."""
