"""Stage 4 of the data path: side effects at the edge (documents, notifications)."""
