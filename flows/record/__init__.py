"""Stage 3 of the data path: the quality record (SQLModel tables, the ledger, queries).

Must not import prefect.
"""
