"""Stage 2 of the data path: SOP definitions run as Prefect flows.

Only ``run_sop``, ``executor`` and ``client`` import Prefect, and only when they are used.
"""
