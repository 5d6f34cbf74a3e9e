"""Model registry: imported model versions, their checksums, approval, deployment, rollback and serving options."""
